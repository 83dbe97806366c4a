"""The built-in plugin: registered through the same hooks as any other plugin."""

from __future__ import annotations

from kdcore.builtin import backbones, datasets, files, losses, schedulers, transforms
from kdcore.losses import divergences
from kdcore.plugins.hookspecs import hookimpl


@hookimpl
def register_losses(register):
    register("ce", losses.CrossEntropy)
    register("kd", losses.KD)
    register("rkd", losses.ReverseKD)


@hookimpl
def register_divergences(register):
    register("kl", divergences.KL)
    register("rkl", divergences.ReverseKL)


@hookimpl
def register_transforms(register):
    register("temperature", transforms.Temperature)
    register("label_smoothing", transforms.LabelSmoothing)
    register("logit_std", transforms.LogitStandardisation)
    register("ctkd", transforms.CurriculumTemperature)


@hookimpl
def register_schedulers(register):
    register("fixed", schedulers.Fixed)
    register("linear", schedulers.Linear)
    register("warmup", schedulers.Warmup)


@hookimpl
def register_backbones(register):
    register("mlp", backbones.MLP)


@hookimpl
def register_datasets(register):
    register("gaussian_mixture", datasets.gaussian_mixture)
    register("tensors", files.tensors)
    register("csv", files.csv)
    register("hf_disk", files.hf_disk)
