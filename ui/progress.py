"""The one-line progress report under the Generate button: stage, step i/N, seconds per step, ETA and memory.

It is Markdown, so it reads the same on the page and in an API client's stream.
"""

from wan_engine import Stage

STAGES = {
    Stage.DOWNLOAD: "Downloading the model",
    Stage.LOAD: "Loading the model",
    Stage.TEXT: "Reading the prompt",
    Stage.IMAGE: "Reading the first frame",
    Stage.DENOISE: "Denoising",
    Stage.DECODE: "Decoding the video",
    Stage.SAVE: "Saving",
}
STAGE_LABELS = {Stage.LOAD: "loading", Stage.TEXT: "prompt", Stage.IMAGE: "first frame", Stage.DENOISE: "denoising",
                Stage.DECODE: "decoding", Stage.SAVE: "saving"}  # the finished line's time of each stage
BAR_WIDTH = 20
READY_TEXT = "Ready. A run's progress shows here."


def bar(step: int, total: int) -> str:
    filled = round(BAR_WIDTH * step / total)
    return "`" + "█" * filled + "░" * (BAR_WIDTH - filled) + "`"


def seconds(value: float) -> str:
    if value < 60:
        return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s" if value >= 1 else f"{value:.2f} s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest:02d} s"


def waiting_text(what: str) -> str:
    return f"**{what}**"


def warming_text(event) -> str:
    """The warm-up's progress: '**Getting the model ready** · **Loading the model** loading the transformer'."""
    return "**Getting the model ready**" + (f" · {event_text(event)}" if event is not None else "")


def ready_text(elapsed_s: float) -> str:
    return f"Ready: the model was prepared in {seconds(elapsed_s)}. A run's progress shows here."


def event_text(event) -> str:
    """A ProgressEvent as a line: '**Denoising** `██░░` step 2/4 · 0.31 s/step · ETA 1.0 s · 1.2 GiB in use'."""
    parts = [f"**{STAGES[event.stage]}**"]
    if event.total:
        parts.append(bar(event.step, event.total))
    parts.append(event.message)
    details = []
    if event.step_s is not None:
        details.append(f"{event.step_s:.2f} s/step")
    if event.eta_s is not None:
        details.append(f"ETA {seconds(event.eta_s)}")
    if event.memory_gib:
        details.append(f"{event.memory_gib:.2f} GiB in use")
    return " ".join(parts) + "".join(f" · {detail}" for detail in details)


def finished_text(result) -> str:
    """'**Done** in 5.2 s · seed 7 · peak memory 21.47 GiB MLX, 5.80 GiB process · saved as `...`' and, below,
    the time of each stage. MLX's peak counts its arrays, the process's the physical memory all of it held (on a Mac
    both come out of the same unified memory)."""
    record = result.record
    stages = []
    for stage, spent in record.stage_seconds().items():
        per_step = f" ({record.seconds_per_step:.2f} s/step)" if stage == Stage.DENOISE else ""
        stages.append(f"{STAGE_LABELS[stage]} {seconds(spent)}{per_step}")
    shared = ""
    if result.parallel:
        layout = result.parallel
        shared = (f"{layout['ranks']} processes (guidance x{layout['guidance']}, sequence x{layout['sequence']}), "
                  "peak memory of rank 0 ")
    kind = ""
    if record.decoder == "tiny":
        kind = "**draft** (tiny decoder; Finish makes it full quality) · "
    elif record.finished_from:
        kind = f"finished from the draft `{record.finished_from}` · "
    if record.segments:
        continued = f", continuing a video of {record.source['frame_count']} frames" if record.source else ""
        kind += f"{len(record.segments)} segment{'s' * (len(record.segments) > 1)}{continued} · "
    return (
        f"**Done** in {seconds(record.total_seconds)} · {kind}seed {result.seed} · "
        f"{shared or 'peak memory '}{result.peak_memory_gib:.2f} GiB MLX, {result.process_peak_rss_gib:.2f} GiB "
        f"process · saved as `{result.video_path.name}`  \n"
        + " · ".join(stages) + "  \n" + tokens_text(result.prompt_tokens)
    )


def tokens_text(tokens: dict) -> str:
    """How much of the prompt the model read: it reads the first `limit` tokens."""
    if tokens["total"] > tokens["limit"]:
        return (f"**Prompt cut**: the model read the first {tokens['used']} of its {tokens['total']} tokens; "
                "the rest was left out")
    return f"prompt: {tokens['used']} of {tokens['limit']} tokens"


def failed_text(message: str) -> str:
    return f"**Failed**: {message}"


def stopped_text(last_event) -> str:
    """What Stop did, naming the step the run reached."""
    where = ""
    if last_event is not None and last_event.stage == Stage.DENOISE:
        where = f" at step {last_event.step}/{last_event.total}"
    elif last_event is not None:
        where = f" while {STAGES[last_event.stage].lower()}"
    return f"**Stopped**{where}. Nothing was written and the run's memory was freed; you can generate again."


def left_line_text() -> str:
    """What Stop did to a run still waiting for its turn."""
    return "**Stopped** while it waited for its turn: it never started, and nothing was written."
