"""Step progress, live preview and interruption of a web job, through generate()'s own hooks.

generate() calls its `callback` with a StepInfo after every sampling step (base pass, then the hires pass) and its
`interrupt_check` before every UNet layer. The monitor tells the JobControl which batch is running (from the step's
image indices), counts the steps against the batch's total (sample.generate.batch_steps, the rule generate() itself
runs by), hands the step's denoised estimate over for the preview, and lets the JobControl raise when the user
interrupts or skips or the server stops.
"""
from sample.generate import StepInfo, batch_steps
from sample.params import GenerationParams

from .worker import JobControl


class StepMonitor:
    """Reports one generate() call with `params` to `control`: pass it as generate(..., callback=monitor,
    interrupt_check=monitor.check). part=(i, n): the call is the i-th of n in one request (a script's), so the
    progress runs over all n calls' batches."""

    def __init__(self, control: JobControl, params: GenerationParams, part: tuple[int, int] = (0, 1)):
        self.control = control
        self.batch_size = params.batch_size
        self.batch_count = params.batch_count * part[1]
        self.first_batch = params.batch_count * part[0]
        self.steps_per_batch = batch_steps(params)
        self.batch = 0
        self.steps_done = 0
        control.begin_batch(self.first_batch, self.batch_count, self.steps_per_batch)

    def __call__(self, step: StepInfo) -> None:
        batch = step.image_indices[0] // self.batch_size
        if batch != self.batch:  # a new batch (A1111's "job" within the request)
            self.batch, self.steps_done = batch, 0
            self.control.begin_batch(self.first_batch + batch, self.batch_count, self.steps_per_batch)
        self.steps_done += 1
        # DPM adaptive chooses its own number of steps, which may exceed the schedule's: progress stays below 1.
        self.control.report(min(self.steps_done / max(self.control.sampling_steps, 1), 1.0), step.denoised)
        self.control.check()

    def check(self) -> None:
        self.control.check()
