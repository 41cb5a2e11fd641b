"""Training the autoencoder itself: reconstruction + KL on pixels (see train.objective.VAEObjective); the output is a
whole model file whose latent scale factor is measured on the trained autoencoder."""
from ..config import TrainConfig
from ..objective import VAEObjective
from .base import Method, need


class VAE(Method):
    trains_autoencoder = True

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        need(not config.class_data, "class_data (prior preservation) needs captions; the VAE is trained without "
                                    "them: remove class_data")
        need(not config.cache_latents, "cache_latents cannot be used when training the VAE itself")

    def set_trainable(self) -> None:
        self.model.first_stage_model.requires_grad_(True)

    @property
    def text_trained(self) -> bool:
        return False

    def objective(self, conditioner):
        return VAEObjective(self.model, self.config.kl_weight, self.config.reconstruction_loss)
