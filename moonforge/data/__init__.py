"""Training data: Megatron indexed datasets for pretraining, SFT conversations with loss masks, and the loader.

records.py   reading JSON/JSONL input with file:line, and the bad-input rules
preprocess.py  ``moonforge data pretrain``: text -> PREFIX_<key>_document.{bin,idx}
chat.py      SFT formats (alpaca, messages, ShareGPT) -> chat-template token ids + loss targets
sft.py       ``moonforge data sft`` (the SFT idxmap) and the SFT / raw-JSON datasets
pretrain.py  megatron-core's GPT dataset at train time (splits, blends, document masking)
loader.py    ``build_dataset`` and the resumable data-parallel ``DataLoader`` (the trainer's entry point)
"""
