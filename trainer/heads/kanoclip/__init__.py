"""KAnoCLIP: ``knowledge.py`` (the LLM-VQA knowledge file), ``blocks.py`` (Bi-CMCI, Conv-Adapter),
``model.py`` (the module), ``train.py`` (losses), ``spec.py`` (registration)."""
