"""Model: the paper's parts -- CBN, memory, trust region, the auto-encoder, discriminator, losses, perceptual
backbones and distance -- and the baselines (MemAE, AE-L2, AE-SSIM, PatchCore-style).

Imports only the top-level modules and its own modules; knows nothing of files, runs or results.
"""
