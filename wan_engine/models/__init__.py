"""The networks: the Wan transformer (`transformer.py`, its rotary embedding `rope.py`), the UMT5 text encoder and
the prompt encoding of diffusers' pipeline (`text_encoder.py`), the Wan VAE (`vae.py`, its layers `vae_layers.py`,
tiled decoding `vae_tiling.py`), the tiny decoder TAEW2.2 (`taehv.py`), and their configs (`config.py`, the shipped TI2V-5B ones in `configs/`). Plain MLX
modules whose names match diffusers' and transformers' checkpoint keys: they know nothing of files, presets, runs
or groups of processes (a group hands the transformer its token share, a plain object, through `shard`).
"""
