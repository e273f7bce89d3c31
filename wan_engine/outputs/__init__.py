"""A run's outputs: the MP4 and its JSON sidecar, which land together or not at all, and reading videos back
(`video.py`, whose check of a video's structure before it lands is `mp4_boxes.py`); a draft's latents kept beside
its video and read back to finish it (`drafts.py`); and the live previews shown while denoising (`preview.py`: the
tiny decoder's picture, or a linear map of the latents). They know the networks they are handed, not how a run is
staged.
"""
