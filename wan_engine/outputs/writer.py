"""The video a run writes, segment after segment, into one MP4 (video.py's VideoOutput, which lands it with its
sidecar): a video it continues first (its frames fitted to the run's size), then each segment's frames but the first
`overlap` of a segment that continues the video so far (they are the video's own last frames, re-decoded). It keeps
the last frames written, which condition the next segment, and nothing else, so memory does not grow with the
length (the float frames too when a caller asks for them: tests and --save-frames). The MP4 opens with the first
decoded frames: a run stopped or killed before then leaves no file at all.
"""

from collections import deque

import mlx.core as mx
import numpy as np

from ..images import SourceVideo
from ..pipeline import frames_to_uint8
from .video import VideoOutput


class VideoWriter:
    def __init__(self, path, width: int, height: int, fps: int, tags: dict, overlap: int, keep_frames: bool,
                 x264_preset: str):
        self.opening = (path, width, height, fps, tags, x264_preset)
        self.output = None  # opened by the first frames
        self.source = None
        self.size = (width, height)
        self.overlap = overlap
        # the last frames written, float32 (H, W, 3) in [0, 1]: a continued video's as read, a segment's as decoded
        # (before the MP4's rounding, so that processes of a group, equal to round-off, condition alike)
        self.tail = deque(maxlen=overlap)
        self.kept = [] if keep_frames else None  # float frames of the segments, when asked
        self.skip = 0  # frames still to drop at the start of the segment being decoded
        self.pending = None  # the frames added last, handed to the device, not yet written: (uint8, tail, kept)

    def add_source(self, source: SourceVideo) -> None:
        """The video to continue: its last frames kept now (they condition the first segment), all of it written
        first when the MP4 opens."""
        self.source = source
        for frame in source.frames(*self.size):
            self.tail.append(frame.astype(np.float32) / 255.0)

    def _open(self) -> None:
        self.output = VideoOutput(*self.opening)
        if self.source is not None:
            batch = []
            for frame in self.source.frames(*self.size):
                batch.append(frame)
                if len(batch) == 8:
                    self.output.add(np.stack(batch))
                    batch = []
            if batch:
                self.output.add(np.stack(batch))

    def abort(self) -> None:
        """Stop and remove whatever was written (nothing lands)."""
        if self.output is not None:
            self.output.abort()

    def begin_segment(self, continues: bool) -> None:
        """A segment's frames come next; one that `continues` the video so far begins with its overlap."""
        self.skip = self.overlap if continues else 0

    def add(self, frames: mx.array) -> None:
        """A segment's decoded frames (T, H, W, 3) in [0, 1], in order. They are handed to the device to be
        converted and written with the next call (or `flush`): the decoder has queued its next chunk by then, so
        the device works on it while these frames are copied out and piped to the encoder."""
        drop = min(self.skip, frames.shape[0])
        self.skip -= drop
        frames = frames[drop:]
        if frames.shape[0] == 0:
            return
        # only the frames kept leave the device as floats: a whole chunk's are 43 MB at 720p
        tail = frames[-self.overlap:].astype(mx.float32) if self.overlap else None
        kept = frames.astype(mx.float32) if self.kept is not None else None
        pending = (frames_to_uint8(frames), tail, kept)
        mx.async_eval([a for a in pending if a is not None])
        self.flush()
        self.pending = pending

    def flush(self) -> None:
        """Write the frames handed over last."""
        if self.pending is None:
            return
        frames, tail, kept = self.pending
        self.pending = None
        if self.output is None:
            self._open()
        self.output.add(np.array(frames))
        if tail is not None:
            self.tail.extend(np.array(tail))
        if kept is not None:
            self.kept.append(np.array(kept))

    def given_frames(self) -> mx.array:
        """The last `overlap` frames written, as the next segment's given frames (1, K, H, W, 3) in [-1, 1] (as
        pipeline.load_image scales a first frame)."""
        self.flush()
        return mx.array(np.stack(self.tail) * 2.0 - 1.0)[None]

    def frames(self) -> np.ndarray | None:
        self.flush()
        return None if self.kept is None else np.concatenate(self.kept)
