"""Sampling: the flow-matching samplers (`samplers.py`: UniPC as diffusers' `UniPCMultistepScheduler`, Euler, and
FastVideo's DMD few-step sampling), each a small object with its timesteps and a `step(prediction, latents)`; and
`SAMPLERS`, their registry, whose entries say what each is for (`description`, `few_step`). Pure functions of
latents and steps: they know neither the networks nor the runs that call them.
"""
