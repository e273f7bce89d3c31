"""Several processes on one video: the `mx.distributed` group that `mlx.launch` starts, and how a run is shared.

    mlx.launch -n 2 -- python -m wan_engine generate --prompt "..."     # one video, one sidecar, from rank 0

Rank 0 owns the request. It encodes the prompt (and the first frame), then hands the request, the text embeddings,
the initial noise and the image latent to the others (`ParallelGroup.hand_off`), which wait for work in
`follower.Follower`. Then every process runs the same stages with its share of the work (`share.RankShare`), and all
keep the same latents:

- guidance-parallel: with guidance > 1 and an even count, one half of the group runs the prompt's branch of the
  guidance pair and the other the negative prompt's; each step the halves exchange their predictions;
- sequence-parallel: the processes of a half (or of the whole group) split each frame's tokens (`share.TokenShare`,
  which the transformer takes in place of its `AllTokens`); self-attention gathers every process's keys and values (exact attention over
  all tokens) and the block output is gathered whole at the end of each step;
- the VAE decode: each process decodes its run of the decoder's exact vertical strips, and rank 0 gathers each
  chunk of frames and writes the MP4 and its sidecar.

Only `all_gather` and `all_sum` are used: they are the collectives every backend has (ring and JACCL have no
`group.split` nor `sum_scatter`, NCCL no `send` / `recv`). So a half's key/value exchange in a group of 4 is an
all-gather over the whole group, each process keeping its own half's (rank-local selection), at twice the bytes
of a sub-group gather. Keys and values are gathered rather than heads exchanged (Ulysses) because MLX has no
all-to-all: built from all-gathers, a head exchange would move every process's queries, keys, values and outputs
to every process, more than the keys and values alone. At 2 processes the two move the same bytes anyway.

The processes meet at a checkpoint before every denoising step and every decoded chunk: each says go, stop (rank
0's cancel token) or failed (with why), so Stop on rank 0 reaches all within a step and an error on one ends the
run on all. Collectives block, so a watchdog thread times the waits: a process that waits more than
`WAN_PARALLEL_TIMEOUT_S` seconds (default 60) in an exchange, or between two transformer blocks of a
sequence-parallel step, declares the group broken; a lost connection (the ring backend says so at once) does the
same. A broken group stays broken: restart it with mlx.launch.

`group.py` holds the group (joining it, collectives, checkpoints, the hand-off of a run), `share.py` a process's
share of one run (and `Alone`, the share of a process that runs alone).
"""
