"""Stage 3, evaluation of exported autoencoders: reconstruction metrics, Fréchet distances
(FID and domain features), VAE diagnostics, reports and model-card results."""
