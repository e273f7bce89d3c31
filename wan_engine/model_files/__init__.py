"""Model files: finding a model (`hub.py`: local folders, the Hugging Face cache, the offline `demo.py` model),
reading a Diffusers snapshot or a package into the networks (`loading.py`, key maps in `weights.py`, quantization in
`quantize.py`, several reader threads in `tensor_reader.py`, the token table left in its file in
`mapped_embedding.py`, the text encoder's blocks read as it runs in `streamed_blocks.py`), writing packages
(`packages.py`), LoRA files (`lora.py`), the prompt tokenizer (`tokenizer.py`), the tiny decoder's weights
(`tiny_decoder.py`: found, or downloaded once and checked), and the disk caches: verified atomic
entries (`cache_files.py`), converted weights (`converted.py`), prompt embeddings (`prompt_cache.py`) and compiled
GPU kernels (`kernel_cache.py`). They build networks from files and know nothing of runs.
"""
