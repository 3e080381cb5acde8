"""Stage 2, the autoencoder: diffusers AutoencoderKL / VQModel, the training-time
quantizer, LPIPS, the PatchGAN discriminator, the losses, the trainer, the export to a
stock diffusers folder and the Tokenizer."""
