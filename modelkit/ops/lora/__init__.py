"""LoRA-family maths, key styles and tools: bake into checkpoints, extract, merge, convert.

* ``loader``: a LoRA file -> modules in RAM; ``math``: each format's weight change;
* ``keymap``: the forward key table (kohya / diffusers / PEFT / ComfyUI names -> checkpoint keys),
  built from a checkpoint's own keys or from a base's reference layout (``arch``; ``dit_ref`` for
  Flux.1 and SD3.x); ``dit``: the Flux/SD3 transformer's names, fused weights cut by rows;
* ``bake``: ``merge_lora``; ``extract``: ``extract_lora``; ``tools``: ``merge_loras``, ``convert_lora``
  (``dit_tools``: Flux/SD3 modules fused or split to the layout the output names; ``peft_out``: the
  files and folders diffusers and PEFT load).
"""
