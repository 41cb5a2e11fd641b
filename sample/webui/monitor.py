"""Step progress, live preview and interruption of one batch of a web job, through generate()'s own hooks.

generate() calls its `callback` with a StepInfo after every sampling step (base pass, then the hires pass) and its
`interrupt_check` before every UNet layer. The monitor counts the steps against the batch's total
(sample.generate.batch_steps, the rule generate() itself runs by), hands the step's denoised estimate to the
JobControl for the preview, and lets the JobControl raise when the user interrupts or skips or the server stops.
"""
from sample.generate import StepInfo

from .worker import JobControl


class StepMonitor:
    """Reports one generate() call to `control`: pass it as generate(..., callback=monitor,
    interrupt_check=monitor.check)."""

    def __init__(self, control: JobControl):
        self.control = control
        self.steps_done = 0

    def __call__(self, step: StepInfo) -> None:
        self.steps_done += 1
        # DPM adaptive chooses its own number of steps, which may exceed the schedule's: progress stays below 1.
        self.control.report(min(self.steps_done / max(self.control.sampling_steps, 1), 1.0), step.denoised)
        self.control.check()

    def check(self) -> None:
        self.control.check()
