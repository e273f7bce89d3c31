"""The VAE decoder's up blocks and head, run on bands of rows from top to bottom (a line-buffer pipeline).

Everything after the decoder's mid block is local in space: 3x3 convolutions, per-pixel norms and activations,
nearest upsampling and pixel shuffles. So a latent frame can flow through those layers a few rows at a time, each
layer holding only its last input rows (the next band's context) instead of whole frames. At 1280x704 a whole
frame's activations at full resolution are ~1 GiB per tensor per chunk; a band of them a few tens of MiB.

The result is exactly the full-frame computation (every output row sees the same inputs and zero padding):
- `RowConv` keeps the last two rows it was given; each band it receives is convolved together with them, without
  padding between bands (zero rows only at the frame's top and bottom), and gives the rows that are now complete,
  so a 3x3 layer's output lags its input by one row.
- `RowQueue` holds a residual branch's rows until the main branch, which lags behind it, reaches them.
- Causal layers keep their history from the previous chunk in `Pieces`, one piece per band: the bands of a frame are
  the same in every chunk, so band k reads and replaces exactly the rows it needs.
Call `push(band, last)` with consecutive bands; it returns the output rows that became complete (or None), and
`last=True` flushes the rest.
"""

import mlx.core as mx

from .vae_layers import last_frames, silu


class Pieces:
    """One causal layer's history in a row-streamed decode, one piece per band; the `FeatureCache` interface
    (read, then write) for the band being processed. A marker (diffusers' 'Rep' state of an upsampler's first
    chunk) is seen from the next chunk on, by every band."""

    def __init__(self):
        self.pieces, self.index = [], 0
        self.marker = self.new_marker = None

    def next_chunk(self):
        self.index, self.marker = 0, self.new_marker

    def read(self):
        return self.pieces[self.index] if self.index < len(self.pieces) else self.marker

    def write(self, value):
        if isinstance(value, str):
            self.new_marker = value
        elif self.index < len(self.pieces):
            self.pieces[self.index] = value
        else:
            self.pieces.append(value)
        self.index += 1

    def arrays(self):
        return self.pieces


class RowQueue:
    """Rows of a residual branch waiting for the main branch."""

    def __init__(self):
        self.rows = None

    def put(self, x: mx.array):
        self.rows = x if self.rows is None else mx.concatenate([self.rows, x], axis=2)

    def take(self, n: int) -> mx.array:
        taken, rest = self.rows[:, :, :n], self.rows[:, :, n:]
        self.rows = mx.contiguous(rest) if rest.shape[2] else None
        return taken

    def arrays(self):
        return [] if self.rows is None else [self.rows]


class RowConv:
    """A 3x3 (in space) convolution over a stream of row bands (B, T, rows, W, C): a causal 3D conv with its
    `Pieces` history, or a per-frame 2D conv (`history` None)."""

    def __init__(self, conv, history: Pieces | None = None):
        self.conv, self.history = conv, history
        self.tail = None  # the last two rows given (after extending them in time with the history)
        self.top_done = False  # the frame's top zero row has been used
        self.zero_frames = getattr(conv, "history_frames", 0)  # causal zero padding in time, less the history

    def push(self, x, last: bool):
        if x is not None:
            if self.history is not None:
                old = self.history.read()
                self.history.write(last_frames(old, x))
                if old is not None:
                    x = mx.concatenate([old, x], axis=1)
                    self.zero_frames = self.conv.history_frames - old.shape[1]
            x = x if self.tail is None else mx.concatenate([self.tail, x], axis=2)
        else:
            x = self.tail
        top, bottom = int(not self.top_done), int(last)
        if x is None or x.shape[2] + top + bottom < 3:  # no output row is complete yet
            self.tail = x
            return None
        self.tail = None if last else mx.contiguous(x[:, :, -2:])
        self.top_done = True
        if self.history is not None:
            return self.conv.convolve(x, self.zero_frames, (top, bottom))
        B, T, H, W, C = x.shape  # per-frame 2D conv
        y = mx.conv_general(x.reshape(B * T, H, W, C), self.conv.weight, padding=([top, 1], [bottom, 1]))
        return (y + self.conv.bias).reshape(B, T, *y.shape[1:])

    def arrays(self):
        return [] if self.tail is None else [self.tail]


class ResnetRows:
    """`WanResidualBlock` on row bands: norm, SiLU, conv, norm, SiLU, conv, plus the (delayed) shortcut."""

    def __init__(self, resnet, histories, settle):
        self.resnet, self.settle = resnet, settle
        self.conv1 = RowConv(resnet.conv1, histories(resnet.conv1))
        self.conv2 = RowConv(resnet.conv2, histories(resnet.conv2))
        self.shortcut = RowQueue()

    def push(self, x, last: bool):
        r = self.resnet
        if x is not None:
            self.shortcut.put(x if r.conv_shortcut is None else r.conv_shortcut(x))
            x = silu(r.norm1(x))
        x = self.settle(self.conv1.push(x, last))
        x = self.conv2.push(None if x is None else silu(r.norm2(x)), last)  # dropout: 0 at inference
        return self.settle(None if x is None else x + self.shortcut.take(x.shape[2]))

    def parts(self):
        return [self.conv1, self.conv2, self.shortcut]


class UpsampleRows:
    """`WanResample` in an upsampling mode on row bands: the time upsampling (causal, per band), 2x nearest in
    space, then its 3x3 conv."""

    def __init__(self, resample, histories):
        self.resample = resample
        self.time_history = histories(resample) if resample.mode == "upsample3d" else None
        self.conv = RowConv(resample.resample[1])

    def push(self, x, last: bool):
        if x is not None:
            if self.time_history is not None:
                x = self.resample._upsample_time(x, self.time_history)
            B, T, H, W, C = x.shape
            x = self.resample.resample[0](x.reshape(B * T, H, W, C))
            x = x.reshape(B, T, *x.shape[1:])
        return self.conv.push(x, last)

    def parts(self):
        return [self.conv]


class UpBlockRows:
    """A decoder stage on row bands: residual blocks, the optional upsampler, and Wan2.2's `avg_shortcut`."""

    def __init__(self, block, histories, settle, first_chunk: bool):
        self.resnets = [ResnetRows(resnet, histories, settle) for resnet in block.resnets]
        upsampler = getattr(block, "upsampler", None) or (getattr(block, "upsamplers", None) or [None])[0]
        self.upsampler = None if upsampler is None else UpsampleRows(upsampler, histories)
        self.avg_shortcut = getattr(block, "avg_shortcut", None)
        self.shortcut = RowQueue()
        self.settle, self.first_chunk = settle, first_chunk

    def push(self, x, last: bool):
        if x is not None and self.avg_shortcut is not None:
            self.shortcut.put(self.avg_shortcut(x, self.first_chunk))
        for resnet in self.resnets:
            x = resnet.push(x, last)
        if self.upsampler is not None:
            x = self.upsampler.push(x, last)
        if x is None or self.avg_shortcut is None:
            return x
        return self.settle(x + self.shortcut.take(x.shape[2]))

    def parts(self):
        parts = [self.shortcut] + [p for r in self.resnets for p in r.parts()]
        return parts + (self.upsampler.parts() if self.upsampler else [])


class DecoderRows:
    """The decoder after its mid block (up blocks, output norm and conv) for one chunk, on row bands.

    `histories` is the decode call's store of causal histories (layer -> Pieces), carried from chunk to chunk.
    """

    def __init__(self, decoder, histories: dict, first_chunk: bool):
        def history(layer):
            if id(layer) not in histories:
                histories[id(layer)] = Pieces()
            return histories[id(layer)]

        for pieces in histories.values():
            pieces.next_chunk()
        self.decoder = decoder
        self.histories = histories
        self.blocks = [UpBlockRows(block, history, self.settle, first_chunk) for block in decoder.up_blocks]
        self.conv_out = RowConv(decoder.conv_out, history(decoder.conv_out))

    def push(self, x, last: bool):
        for block in self.blocks:
            x = block.push(x, last)
        if x is not None:
            x = silu(self.decoder.norm_out(x))
        return self.conv_out.push(x, last)

    def arrays(self) -> list:
        """The state that the next band reads: line buffers, queued rows, histories."""
        parts = [p for block in self.blocks for p in block.parts()] + [self.conv_out]
        parts += list(self.histories.values())
        return [a for part in parts for a in part.arrays() if isinstance(a, mx.array)]

    def settle(self, x):
        """Evaluate x and the state so far. A GPU backend keeps every buffer of the work it was given until that
        work completes, so evaluating often (after each conv of a residual block) bounds the memory to a few
        tensors of one band."""
        mx.eval([] if x is None else x, self.arrays())
        return x
