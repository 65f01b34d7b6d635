"""nnlib.generative: models that learn a data distribution and sample from it.

* ``vae``: the variational autoencoder (Kingma & Welling 2014): ELBO with an
  analytic KL, reparameterised sampling, the IWAE bound, ``sample``,
  ``reconstruct``, ``interpolate``.
* ``diffusion``: DDPM (Ho et al. 2020): noise schedules, the closed-form
  forward process and its posterior, the noise-prediction loss, ancestral
  sampling in one ``lax.scan``, and DDIM.
* ``quality``: sample-quality proxies from a trained classifier (confidence,
  class diversity, Fréchet distance of its features) and text diversity
  (distinct-n, the model's own NLL).

Text generation from the language models is ``nnlib.models.generate``.
"""

from nnlib.generative.diffusion import (
    SCHEDULES,
    MLPDenoiser,
    NoiseSchedule,
    cosine_betas,
    ddim_sample,
    ddim_timesteps,
    ddpm_loss,
    ddpm_sample,
    linear_betas,
    make_ddpm_train_step,
    noise_schedule,
    predict_x0_from_noise,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from nnlib.generative.quality import (
    class_diversity,
    distinct_ngram_ratio,
    frechet_distance,
    frechet_distance_gaussians,
    mean_max_confidence,
    penultimate_features,
    predicted_class_counts,
    quality_scores,
    sample_quality,
    sequence_nll,
)
from nnlib.generative.vae import (
    LIKELIHOODS,
    VAE,
    ELBOTerms,
    VAEOutput,
    diagonal_gaussian_log_prob,
    elbo,
    gaussian_kl,
    interpolate,
    iwae_bound,
    log_likelihood,
    reconstruct,
    reparameterize,
    sample,
    vae_loss,
)

__all__ = [
    "LIKELIHOODS",
    "SCHEDULES",
    "VAE",
    "ELBOTerms",
    "MLPDenoiser",
    "NoiseSchedule",
    "VAEOutput",
    "class_diversity",
    "cosine_betas",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_loss",
    "ddpm_sample",
    "diagonal_gaussian_log_prob",
    "distinct_ngram_ratio",
    "elbo",
    "frechet_distance",
    "frechet_distance_gaussians",
    "gaussian_kl",
    "interpolate",
    "iwae_bound",
    "linear_betas",
    "log_likelihood",
    "make_ddpm_train_step",
    "mean_max_confidence",
    "noise_schedule",
    "penultimate_features",
    "predict_x0_from_noise",
    "predicted_class_counts",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "quality_scores",
    "reconstruct",
    "reparameterize",
    "sample",
    "sample_quality",
    "sequence_nll",
    "vae_loss",
]
