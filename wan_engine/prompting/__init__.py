"""The prompt writer: Wan2.2's prompt extension (its `generate.py --use_prompt_extend`, `wan/utils/prompt_extend.py`)
on MLX. A small instruct model rewrites a short prompt into the long, concrete description the video model was
trained on, following Wan's own system prompts (`system_prompts.json`: the text-to-video and image-to-video ones
TI2V-5B uses, English and Chinese, from Wan-Video/Wan2.2's `wan/utils/system_prompt.py`, Apache-2.0). Text prompts
go through `mlx-lm` (Qwen2.5 instruct), image-to-video ones through `mlx-vlm` (Qwen2.5-VL, which looks at the
picture). Both are optional extras (`requirements-prompt.txt`), imported only when a prompt is written; the writer
sits outside the engine's loop and loads its model only when asked (`writer.py`).
"""
