"""Diffusers folders <-> LDM single files (the A1111/ComfyUI layout), in the core: no torch.

``names`` holds the key maps, ``bpe`` the CLIP vocabulary, ``configs/`` the shipped diffusers configs
of SD1, SD2 (eps and v) and SDXL, ``folder`` opens a diffusers folder as a lazy ``ModelFile`` in LDM
names, ``plan`` splits an LDM ``ModelFile`` into diffusers components.
"""
