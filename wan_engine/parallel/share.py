"""A process's share of one run: which branch of the guidance pair it runs, which tokens, which strips of the
decode, and the exchanges that join the shares. `Alone` is the share of a process that runs alone: it has all of
the work and exchanges nothing, so the pipeline's loops are the same code in both cases.

The pipeline asks its share, at each step and decoded chunk: `checkpoint(cancel)` first (where Stop, or a failure
on any process, reaches all of them), then `exchange_branches` / `gather_columns`, then `unit_done()`. The
transformer takes the share's `tokens` (`WanTransformer.shard`), and the VAE decodes the strips of `decode_share`.
"""

from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx

from ..errors import Cancelled, WanError
from ..models.vae import strip_layout
from .group import CHECKPOINT_BYTES, ParallelGroup


class Alone:
    """The share of a process that runs alone: all of the work, nothing to exchange, Stop checked locally."""
    is_owner = True
    tokens = None  # all of them
    decode_share = (0, 1)  # all of the strips
    decodes = True

    def branch_context(self, context: mx.array) -> mx.array:
        return context

    def checkpoint(self, cancel) -> None:
        if cancel is not None and cancel.cancelled:
            raise Cancelled()

    def exchange_branches(self, prediction: mx.array) -> mx.array:
        return prediction

    def gather_columns(self, chunk: mx.array) -> mx.array:
        return chunk

    def unit_done(self, finished: bool = False) -> None:
        pass

    def record(self) -> None:
        """What the sidecar says of the group: nothing."""
        return None


ALONE = Alone()


@dataclass(frozen=True)
class Layout:
    """How a run's work is shared: `guidance` (2: the guidance pair's branches on the two halves of the group, or
    1) times `sequence` (processes sharing each branch's tokens) is `ranks`."""
    ranks: int
    guidance: int
    sequence: int

    @classmethod
    def choose(cls, ranks: int, use_guidance: bool) -> "Layout":
        guidance = 2 if use_guidance and ranks % 2 == 0 else 1
        return cls(ranks, guidance, ranks // guidance)

    def as_dict(self) -> dict:
        return {"ranks": self.ranks, "guidance": self.guidance, "sequence": self.sequence}


class RankShare:
    """One process's share of one run in a group: its branch of the guidance pair (`branch`, None: both), its
    tokens (`tokens`, None: all), its run of the decode's strips (`decode_share`, None: rank 0 decodes alone, in
    tiles), and the exchanges that join the shares."""

    def __init__(self, group: ParallelGroup, layout: Layout, latent_grid: tuple, transformer_config, steps: int,
                 guidance: float, decode_strips: list | None, spatial: int, itemsize: int):
        """latent_grid: (frames, height, width) of the latents; decode_strips: the VAE's strips of the video's latent
        width laid out for the group (`strip_layout`), or None when the decode is tiled."""
        self.group, self.layout, self.latent_grid = group, layout, latent_grid
        self.is_owner = group.is_owner
        self.transformer_config, self.steps, self.guidance, self.itemsize = transformer_config, steps, guidance, itemsize
        frames, height, width = latent_grid
        p_t, p_h, p_w = transformer_config.patch_size
        rank = group.rank
        self.branch = rank // layout.sequence if layout.guidance == 2 else None
        self.tokens = None
        if layout.sequence > 1:
            first = rank - rank % layout.sequence
            self.tokens = TokenShare(group, first, layout.sequence, rank - first, frames // p_t,
                                     (height // p_h) * (width // p_w))
            if self.tokens.tokens < layout.sequence:
                raise WanError(f"a frame of {self.tokens.tokens} tokens cannot be shared by {layout.sequence} "
                               "processes: make the video larger or the group smaller")
        self.decode_share = None if decode_strips is None else (rank, group.size)
        self.decodes = self.is_owner or decode_strips is not None
        if decode_strips is not None:  # each share's own pixel columns
            per_share = len(decode_strips) // group.size
            self.share_widths = [spatial * (decode_strips[(i + 1) * per_share - 1][1] - decode_strips[i * per_share][0])
                                 for i in range(group.size)]
        self.steps_left = steps
        self.in_unit = False

    @staticmethod
    def strips(width: int, strip_width: int | None, size: int) -> list:
        """The decode's strips of `width` latent columns laid out for `size` processes (each share's own columns do
        not depend on the margin)."""
        try:
            return strip_layout(width, strip_width, 0, size)
        except ValueError as error:
            raise WanError(f"the decode of this video cannot be shared by {size} processes: {error} "
                           "(make the video wider or the group smaller)") from None

    def branch_context(self, context: mx.array) -> mx.array:
        """The text embeddings of this process's branch of the guidance pair."""
        return context if self.branch is None else context[self.branch : self.branch + 1]

    def checkpoint(self, cancel) -> None:
        """The start of a step or of a decoded chunk's exchange; rank 0's `cancel` stops every process here."""
        self.group.checkpoint(self.group.is_owner and cancel is not None and cancel.cancelled)
        self.in_unit = True

    def unit_done(self, finished: bool = False) -> None:
        """A step or a decoded chunk is complete (`finished`: the run's last exchange is behind)."""
        self.in_unit = False
        self.group.stop_waiting()
        if self.steps_left:
            self.steps_left -= 1
            finished = finished or (self.steps_left == 0 and self.decode_share is None)
        if finished:
            self.group.run = None

    def exchange_branches(self, prediction: mx.array) -> mx.array:
        """This half's prediction (1, ...) -> the pair (2, ...): the prompt's, then the negative prompt's."""
        if self.branch is None:
            return prediction
        mx.eval(prediction)  # this process's own work: the watchdog does not time it
        everyone = self.group.exchange(self.group.all_gather(prediction), "exchanging the guidance pair")
        return everyone[:: self.layout.sequence]

    def gather_columns(self, chunk: mx.array) -> mx.array | None:
        """This share's columns of a decoded chunk (1, T, H, w, 3) -> the whole chunk on rank 0, None elsewhere."""
        widths, own = self.share_widths, chunk.shape[3]
        chunk = mx.pad(chunk, [(0, 0)] * 3 + [(0, max(widths) - own), (0, 0)])
        everyone = self.group.exchange(self.group.all_gather(chunk), "gathering decoded frames")
        if not self.group.is_owner:
            return None
        return mx.concatenate([everyone[i : i + 1, :, :, :width] for i, width in enumerate(widths)], axis=3)

    def record(self) -> dict:
        """What the sidecar says of the group."""
        return {**self.layout.as_dict(), "exchanged_mib_per_step": round(self.exchanged_bytes_per_step / 2**20, 3)}

    @cached_property
    def exchanged_bytes_per_step(self) -> int:
        """Bytes each process receives per denoising step (a ring all-gather of n pieces brings n - 1 of them)."""
        config, (frames, height, width), n = self.transformer_config, self.latent_grid, self.group.size
        received = (n - 1) * CHECKPOINT_BYTES
        batch = 1 if self.branch is not None else 1 + (self.guidance > 1)
        if self.branch is not None:  # the prediction (1, F, H, W, C) of every process
            received += (n - 1) * frames * height * width * config.out_channels * self.itemsize
        if self.tokens is not None:  # keys and values of every block, and the block output once
            p_t, p_h, p_w = config.patch_size
            longest = self.tokens.groups * max(self.tokens.sizes)
            keys_values = 2 * config.num_layers * longest * config.inner_dim
            output = longest * config.out_channels * p_t * p_h * p_w
            received += (n - 1) * batch * (keys_values + output) * self.itemsize
        return received


@dataclass(frozen=True)
class TokenShare:
    """The transformer's token layout in a group (models/transformer.py's `AllTokens`, shared): process `index` of
    the `count` processes from rank `first` on, which share `tokens` tokens in each of `groups` timestep groups (the
    frames), takes its contiguous, as even as can be, range of each group. Uneven ranges are padded for the
    all-gathers and the padding dropped after."""
    group: ParallelGroup
    first: int
    count: int
    index: int
    groups: int
    tokens: int

    @property
    def bounds(self) -> list[int]:
        return [round(i * self.tokens / self.count) for i in range(self.count + 1)]

    @property
    def sizes(self) -> list[int]:
        bounds = self.bounds
        return [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def own(self, x: mx.array, rope: tuple) -> tuple:
        """(B, groups, tokens, dim) and the rotary tables (groups * tokens, 1, head_dim) -> this process's tokens
        (B, groups, n, dim) and their own rows of the tables. A step of the run begins: from here the watchdog
        expects every block to finish within the timeout."""
        if x.shape[1:3] != (self.groups, self.tokens):
            raise ValueError(f"tokens {x.shape[1:3]} do not match the share's {(self.groups, self.tokens)}")
        self.group.expect_progress("running a sequence-parallel step")
        low, high = self.bounds[self.index : self.index + 2]
        rope = tuple(table.reshape(self.groups, self.tokens, *table.shape[1:])[:, low:high].reshape(-1, *table.shape[1:])
                     for table in rope)
        return x[:, :, low:high], rope

    def gather_keys(self, keys: mx.array) -> mx.array:
        """(B, groups * n, heads, head_dim) -> those of all `count` processes (B, groups * tokens, ...), process
        by process: attention does not depend on the order of its keys and values."""
        return self._gather(keys, 1, [self.groups * size for size in self.sizes])

    def gather_tokens(self, x: mx.array) -> mx.array:
        """(B, groups, n, C) -> (B, groups, tokens, C) in the tokens' order."""
        return self._gather(x, 2, self.sizes)

    def block_done(self) -> None:
        self.group.progress()

    def _gather(self, x: mx.array, axis: int, lengths: list[int]) -> mx.array:
        longest = max(lengths)
        if x.shape[axis] < longest:
            x = mx.pad(x, [(0, 0)] * axis + [(0, longest - x.shape[axis])] + [(0, 0)] * (x.ndim - axis - 1))
        everyone = self.group.all_gather(x).reshape(self.group.size, *x.shape)
        cut = (slice(None),) * axis
        return mx.concatenate([everyone[self.first + i][cut + (slice(0, length),)] for i, length in enumerate(lengths)],
                              axis=axis)
