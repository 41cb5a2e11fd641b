"""Full fine-tuning, and DreamBooth (Ruiz et al. 2023): full fine-tuning on instance images that all carry one
instance prompt, beside class (prior) images that keep the model drawing the class."""
from ..config import TrainConfig
from .base import Method, need


class FullFineTune(Method):
    """The UNet (and with train_text_encoder the text towers) trains; the output is a whole model file."""


class DreamBooth(Method):
    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        need(bool(config.instance_prompt) and bool(config.class_prompt),
             "dreambooth needs instance_prompt (e.g. 'a photo of sks dog') and class_prompt ('a photo of a dog')")
        need(bool(config.class_data), "dreambooth needs class_data: the folder of class (prior) images, which is "
                                      "filled up to num_class_images by sampling the model")

    def empty_captions(self) -> str:
        # Every instance image is captioned with the instance prompt, so an empty caption file means nothing.
        return "keep"

    def prepare_items(self, items: list) -> None:
        for item in items:
            item.caption = self.config.instance_prompt
