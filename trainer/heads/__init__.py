"""Light heads on frozen backbones: few-shot memories, AF-CLIP, CMAD, ..."""
