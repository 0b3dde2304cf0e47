"""Which machine fits which trained network, and the checks that refuse a mismatched pair.

A network trained with zero padding is described by the zero-padding machines (bbELS, LS); one
trained with circular padding by circular ELS. A class-conditional network needs a conditional
machine, and the machine's bank must be the network's own training data. A calibration
belongs to the network it was calibrated against. Every mismatch is an error naming both sides:
pairing them anyway gives numbers that look plausible and mean nothing.
"""

from __future__ import annotations

import logging

from machines.comparators import comparator_kind

log = logging.getLogger(__name__)

RULE_PADDING = {"LS": "zeros", "bbELS": "zeros", "ELS": "circular"}
"""The boundary each patch machine assumes."""


def machine_for(train_cfg: dict, machine: str | None, model: str) -> str:
    """The patch machine for a network: ``machine`` checked against the network's padding, or (None) the
    network's own rule — ELS for a circularly padded network, bbELS for a zero-padded one."""
    padding = train_cfg.get("padding", "zeros")
    if machine is None:
        return "ELS" if padding == "circular" else "bbELS"
    if machine not in RULE_PADDING:
        raise ValueError(f"machine must be a patch machine ({', '.join(RULE_PADDING)}), got {machine!r}")
    if RULE_PADDING[machine] != padding:
        fits = "ELS" if padding == "circular" else "bbELS or LS"
        raise ValueError(f"the network {model} was trained with {padding} padding but the {machine} machine assumes "
                         f"{RULE_PADDING[machine]} padding; use {fits}")
    return machine


def check_machine_options(train_cfg: dict, model: str, *, machine: str, conditional: bool, fingerprint: str,
                          data_name: str = "the machine's data") -> None:
    """A machine built with these options must fit the network of ``train_cfg``: same training data (by
    fingerprint), the padding rule (patch machines; a comparator theory has none) and the conditioning.
    Raises ``ValueError`` naming both sides."""
    if train_cfg.get("fingerprint") not in (None, fingerprint):
        raise ValueError(f"the network {model} was trained on other data ({train_cfg.get('dataset')}, "
                         f"{train_cfg.get('train_images', '?')} images, fingerprint {str(train_cfg['fingerprint'])[:12]}) "
                         f"than {data_name} (fingerprint {fingerprint[:12]})")
    if comparator_kind(machine) is None:
        machine_for(train_cfg, machine, model)
    net_conditional = bool(train_cfg.get("conditional", False))
    if net_conditional != conditional:
        side = ("a class-conditional network", "an unconditional machine") if net_conditional else \
            ("an unconditional network", "a class-conditional machine")
        raise ValueError(f"{model} is {side[0]} but the {machine} machine is {side[1]}; "
                         f"{'pass --conditional' if net_conditional else 'drop --conditional'}")


def calibration_record(model: str, weights: str, train_cfg: dict, machine: str, n_train: int | None = None) -> dict:
    """What a calibration is bound to: the network (path and weights hash), its data, the machine and the
    number of training images in the machine's bank (None: all of the network's)."""
    return {"model": model, "weights": weights, "dataset": train_cfg.get("dataset"), "data": train_cfg.get("fingerprint"),
            "padding": train_cfg.get("padding", "zeros"), "conditional": bool(train_cfg.get("conditional", False)),
            "machine": machine, "n_train": n_train if n_train is not None else train_cfg.get("train_images")}


def check_calibration(calibration: dict, path: str, model: str, weights: str, train_cfg: dict, machine: str,
                      other_network: bool = False, n_train: int | None = None) -> None:
    """A calibration must have been made for this network and this machine kind; raises ``ValueError``
    naming the calibration's side and this run's. A calibration written before calibrations recorded
    their network is checked by its machine only (with a warning). ``other_network``: the calibration was
    made against another network on purpose (the paper evaluates its attention UNet at the ResNet's
    calibrated scales); data, padding, conditioning and machine must still match, the weights may differ.
    ``n_train``: this run's number of training images; a calibration made with another is used, with a warning (the
    scales describe the network, but were chosen against those images)."""
    made = calibration.get("network")
    if made is None:
        log.warning("%s does not record the network it was calibrated against; only its machine is checked", path)
        made = {"machine": calibration.get("config", {}).get("machine", machine)}
    if made.get("machine", machine) != machine:
        raise ValueError(f"{path} calibrates the {made['machine']} machine, not {machine}; "
                         f"evaluate with --machine {made['machine']} or calibrate {machine}")
    if "data" in made and made["data"] != train_cfg.get("fingerprint"):
        raise ValueError(f"{path} was calibrated for a network trained on other data ({made.get('dataset')}, fingerprint "
                         f"{str(made['data'])[:12]}) than {model} ({train_cfg.get('dataset')}, fingerprint "
                         f"{str(train_cfg.get('fingerprint'))[:12]})")
    for key in ("padding", "conditional"):
        if key in made and made[key] != train_cfg.get(key, made[key]):
            raise ValueError(f"{path} was calibrated for a network with {key} = {made[key]}, but {model} has "
                             f"{key} = {train_cfg.get(key)}")
    if "weights" in made and made["weights"] != weights and not other_network:
        raise ValueError(f"{path} was calibrated against the network {made.get('model')} (weights {made['weights'][:12]}), "
                         f"not {model} (weights {weights[:12]}); calibrate this network first, or pass --other-network to "
                         "use another network's scales on purpose")
    made_with = made.get("n_train", made.get("dictionary", train_cfg.get("train_images")))
    if n_train is not None and made_with is not None and made_with != n_train:
        log.warning("%s was calibrated with %s training images; this machine holds %s", path, made_with, n_train)


_DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "celeba": "CelebA"}
_ARCH_NAMES = {"resnet": "ResNet", "unet": "UNet"}


def paper_schedule_name(train_cfg: dict) -> str | None:
    """The name of the paper's calibrated schedule for a network like this one (``machines/data/scales.json``,
    e.g. ``FashionMNIST_ResNet_zeros_conditional``), or None when the paper calibrated none."""
    from machines.schedule import reference_schedules

    name = "_".join([_DATASET_NAMES.get(train_cfg.get("dataset", ""), "?"), _ARCH_NAMES.get(train_cfg.get("arch", ""), "?"),
                     train_cfg.get("padding", "zeros")] + (["conditional"] if train_cfg.get("conditional") else []))
    return name if name in reference_schedules()["schedules"] else None
