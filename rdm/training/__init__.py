"""Training code for the bundled `tiny` model, kept apart from inference code.

`contrastive` trains the tiny CLIP, `autoencoder` the KL first stage, `neighbors` finds each
training image's retrieval neighbours, `diffusion` trains the UNet on [query ; neighbours] contexts
and `recipe` holds the hyper-parameters. Nothing here is imported by `rdm` itself.
"""
