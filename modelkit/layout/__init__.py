"""Diffusers folders <-> LDM single files (the A1111/ComfyUI layout), in the core: no torch.

``names`` holds the key maps, ``bpe`` the CLIP vocabulary, ``configs/`` the shipped diffusers configs
of SD1, SD2 (eps and v) and SDXL, ``folder`` opens a diffusers folder as a lazy ``ModelFile`` in LDM
names, ``plan`` splits an LDM ``ModelFile`` into diffusers components; ``dit`` (maps) and ``dit_folder``
do the same for Flux.1 and SD3.x, whose shipped configs are ``flux-dev``, ``flux-schnell``,
``sd3-medium``, ``sd3.5-medium`` and ``sd3.5-large``.
"""
