"""LoRA-family maths, key styles and tools: bake into checkpoints, extract, merge, convert.

* ``loader``: a LoRA file -> modules in RAM; ``math``: each format's weight change;
* ``keymap``: the forward key table (kohya / diffusers / PEFT / ComfyUI names -> checkpoint keys),
  built from a checkpoint's own keys or from a base's reference layout (``arch``);
* ``bake``: ``merge_lora``; ``extract``: ``extract_lora``; ``tools``: ``merge_loras``, ``convert_lora``.
"""
