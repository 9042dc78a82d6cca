"""Evaluation of the tiny model: corpus-trained label classifiers and the style-control experiment."""
