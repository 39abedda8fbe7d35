"""IIPAD (Lv et al., ICLR 2025; seeds/IIPAD.txt): one-for-all few-shot inspection with
instance-induced prompts and a category-aware memory. Work in progress: the prompt generator
(``prompts.py``) and the guidance losses (``losses.py``); the head is not registered yet."""
