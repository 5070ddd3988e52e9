"""The numeric formats checkpoints ship their weights in, below `experts/` and `checkpoint.py` (it imports
neither): bytes <-> values and the reference dequantization of FP8 blocks (`fp8.py`) and compressed-tensors'
packed int4 (`compressed.py`), MXFP4's numerics (`mxfp4.py`, gpt-oss's experts), and the reorderings of a
checkpoint's rows into ours (`rows.py`); `schemes.scheme` reads a config.json's `quantization_config` into one of
them. And GGUF models (llama.cpp's files): `gguf.py` (files, metadata, tensor index), `gguf_model.py`
(`GgufModel`), `ggml.py` (ggml's block numerics), `gguf_vocab.py` (the tokenizer from the metadata)."""

# Nothing is imported here: the server's HTTP process imports `gguf` and `gguf_vocab` for a GGUF model's
# tokenizer, and must not load torch (the numerics modules import it).
