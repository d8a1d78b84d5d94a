"""diffusers models: lossfloor's per-σ model loss against an independent computation through
diffusers' own ``scheduler.add_noise`` and the scheduler's x0 formulas, for every prediction
type, DDIM/Euler/DPM-Solver configs, class labels, learned variance and zero terminal SNR."""

from __future__ import annotations

import json

import pytest
import torch

from lossfloor.data import load_dataset
from lossfloor.diagnosis import model_per_sample_loss
from lossfloor.errors import UserError
from lossfloor.models import load_model
from lossfloor.optimal.draws import OuterPlan, block_noise

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")
M = 48


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", limit=64)


def tiny_unet(seed=0, **config):
    """A random 8×8 UNet2DModel (weights perturbed so every output channel matters)."""
    torch.manual_seed(seed)
    kw = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
              down_block_types=("DownBlock2D", "DownBlock2D"), layers_per_block=1,
              up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)  # fmt: skip
    unet = diffusers.UNet2DModel(**{**kw, **config})
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def save(path, unet, scheduler, alone=False):
    """A pipeline layout (unet/, scheduler/), or the UNet alone with scheduler_config.json."""
    unet.save_pretrained(path if alone else path / "unet")
    scheduler.save_pretrained(path if alone else path / "scheduler")
    return path


def reference_loss(unet, scheduler, x0, eps, t, labels=None):
    """‖x̂0 − x0‖²/D per sample, x_t from scheduler.add_noise and x̂0 by the scheduler's
    pred_original_sample formula for its prediction_type (ε-prediction for Euler)."""
    ab = scheduler.alphas_cumprod[t]
    steps = torch.full((len(x0),), t, dtype=torch.long)
    x_t = scheduler.add_noise(x0, eps, steps)
    if isinstance(scheduler, diffusers.EulerDiscreteScheduler):
        # Euler works in VE form: add_noise gives x0 + σε, the UNet sees x/√(σ² + 1) and
        # step's pred_original_sample is x − σ·ε̂
        sigma = scheduler.sigmas[scheduler.index_for_timestep(steps[0])]
        with torch.no_grad():
            out = unet(x_t / (sigma**2 + 1).sqrt(), steps, class_labels=labels).sample
        return ((x_t - sigma * out).double() - x0.double()).pow(2).flatten(1).mean(1)
    with torch.no_grad():
        out = unet(x_t, steps, class_labels=labels).sample[:, : x0.shape[1]]
    x0_hat = {
        "epsilon": lambda: (x_t - (1 - ab).sqrt() * out) / ab.sqrt(),
        "v_prediction": lambda: ab.sqrt() * x_t - (1 - ab).sqrt() * out,
        "sample": lambda: out,
    }[scheduler.config.prediction_type]()
    return (x0_hat.double() - x0.double()).pow(2).flatten(1).mean(1)


def compare(path, unet, scheduler, ds, timesteps=(20, 400, 850), labels=None):
    """lossfloor's per-sample model loss at σ̃ of each timestep equals the reference on the
    same (x0, ε) draws."""
    model, info = load_model(str(path), ds)
    plan = OuterPlan.build(ds.x, ds.labels, M, 0, False)
    x0 = ds.x[plan.sources]
    eps = block_noise(plan.seed, 0, M, ds.dim).reshape(x0.shape).float()
    y = None if labels is None else labels[plan.sources]
    for t in timesteps:
        ab = scheduler.alphas_cumprod[t].double()
        sigma = float(((1 - ab) / ab).sqrt())
        ours = model_per_sample_loss(model, ds, plan, sigma, 16, torch.device("cpu"), labels)
        ref = reference_loss(unet, scheduler, x0, eps, t, y)
        torch.testing.assert_close(ours, ref, rtol=2e-4, atol=1e-6)
    return model, info


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "prediction", "alone"),
    [
        ("ddpm", "epsilon", False),
        ("ddpm", "v_prediction", False),
        ("ddpm", "sample", True),
        ("ddim", "epsilon", True),
        ("ddim", "v_prediction", False),
    ],
)
def test_model_loss_equals_diffusers_computation(tmp_path, digits, kind, prediction, alone):
    unet = tiny_unet(seed=len(prediction))
    if kind == "ddpm":
        scheduler = diffusers.DDPMScheduler(prediction_type=prediction)
    else:  # a DDIM config of another β schedule
        scheduler = diffusers.DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            prediction_type=prediction,
        )  # fmt: skip
    path = save(tmp_path / "m", unet, scheduler, alone)
    model, info = compare(path, unet, scheduler, digits)
    assert info["prediction_type"] == prediction and info["image_shape"] == [1, 8, 8]
    assert model.target.name == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction]


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_other_schedulers_with_alphas_cumprod_load(tmp_path, digits, name):
    scheduler = getattr(diffusers, name)(prediction_type="epsilon")
    unet = tiny_unet(seed=3)
    path = save(tmp_path / "m", unet, scheduler)
    if name.startswith("DPMSolver"):
        # its add_noise indexes σ by the inference timesteps, valid only after set_timesteps;
        # its x0 formula for ε is DDPM's (x_t − σ_t·ε̂)/α_t on the same ᾱ table
        reference = diffusers.DDPMScheduler.from_config(scheduler.config)
        assert torch.equal(reference.alphas_cumprod, scheduler.alphas_cumprod)
        scheduler = reference
    compare(path, unet, scheduler, digits, timesteps=(100, 700))


def test_class_conditional_unet_gets_the_data_labels(tmp_path, digits):
    unet = tiny_unet(seed=4, num_class_embeds=10)
    scheduler = diffusers.DDPMScheduler()
    path = save(tmp_path / "m", unet, scheduler)
    model, info = compare(path, unet, scheduler, digits, (300,), labels=digits.labels)
    assert info["conditional"] and info["num_classes"] == 10
    x = torch.zeros(2, 1, 8, 8)
    assert not torch.equal(model(x, 1.0, torch.tensor([0, 0])), model(x, 1.0, torch.tensor([0, 5])))
    with pytest.raises(UserError, match="class-conditional"):
        model(x, 1.0)
    path5 = save(tmp_path / "m5", tiny_unet(seed=4, num_class_embeds=5), scheduler)
    with pytest.raises(UserError, match="labels up to 9 but the model knows 5 classes"):
        load_model(str(path5), digits)


def test_learned_variance_channels_are_split_off(tmp_path, digits):
    unet = tiny_unet(seed=5, out_channels=2)
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range")
    compare(save(tmp_path / "m", unet, scheduler), unet, scheduler, digits, (50, 600))
    fixed = save(tmp_path / "f", unet, diffusers.DDPMScheduler(variance_type="fixed_small"))
    with pytest.raises(UserError, match="2 output channels for 1 input channels"):
        load_model(str(fixed), digits)


def test_zero_terminal_snr_restricts_the_range(tmp_path, digits):
    from lossfloor.diagnosis import diagnose

    for cls in (diffusers.DDPMScheduler, diffusers.EulerDiscreteScheduler):
        scheduler = cls(rescale_betas_zero_snr=True)
        unet = tiny_unet(seed=6)
        path = save(tmp_path / cls.__name__, unet, scheduler)
        model, info = compare(path, unet, scheduler, digits, (10, 998))
        assert info["timesteps"] == 999 and info["timesteps_dropped"] == 1
        ab = scheduler.alphas_cumprod[998].double()
        assert model.sigma_max == pytest.approx(float(((1 - ab) / ab).sqrt()), rel=1e-12)
        with pytest.raises(UserError, match="outside the model's range"):
            diagnose(model, digits, [1.0, 2 * model.sigma_max], outer=8, progress=False)


def test_unsupported_models_are_one_line_errors_naming_the_problem(tmp_path, digits):
    sched = diffusers.DDPMScheduler()
    cases = [
        (save(tmp_path / "a", tiny_unet(sample_size=16), sched), "takes 1×16×16 images"),
        (save(tmp_path / "b", tiny_unet(in_channels=3, out_channels=3), sched),
         "takes 3×8×8 images"),
        (save(tmp_path / "c", tiny_unet(), diffusers.FlowMatchEulerDiscreteScheduler()),
         "FlowMatchEulerDiscreteScheduler has no alphas_cumprod"),
    ]  # fmt: skip
    bad = save(tmp_path / "d", tiny_unet(), sched)
    config = json.loads((bad / "scheduler" / "scheduler_config.json").read_text())
    config["prediction_type"] = "flow_prediction"
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    cases.append((bad, "prediction_type 'flow_prediction' is not supported"))
    alone = tmp_path / "e"
    tiny_unet().save_pretrained(alone)
    cases.append((alone, "no scheduler_config.json"))
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            load_model(str(path), digits)


def test_cli_samples_and_diagnoses_a_class_conditional_pipeline(tmp_path, capsys):
    import numpy as np

    import lossfloor.cli

    path = save(tmp_path / "m", tiny_unet(seed=7, num_class_embeds=10), diffusers.DDPMScheduler())
    npz, out = tmp_path / "s.npz", tmp_path / "d.json"
    argv = ["sample", "--model", str(path), "--n", "3", "--steps", "3", "--labels", "4,7",
            "--churn", "5", "--no-progress", "--out-npz", str(npz)]  # fmt: skip
    assert lossfloor.cli.main(argv) == 0
    with np.load(npz) as f:
        meta = json.loads(str(f["meta"]))
        assert f["x"].shape == (3, 1, 8, 8) and f["y"].tolist() == [4, 7, 4]
    # the range of DDPM's linear table is [σ̃(0), σ̃(999)] ≈ [0.01, 157]: the sampler's 80 → 0.01
    ab = diffusers.DDPMScheduler().alphas_cumprod[0].double()
    assert meta["sigma_min"] == pytest.approx(float(((1 - ab) / ab).sqrt()), rel=1e-9)
    assert meta["sigma_max"] == 80.0 and meta["churn"]["S_churn"] == 5.0
    argv = ["diagnose", "--model", str(path), "--data", "digits", "--limit", "40", "--sigmas",
            "0.5,5", "--outer", "16", "--no-cache", "--quiet", "--out", str(out)]  # fmt: skip
    assert lossfloor.cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["dataset"]["conditional"] and result["model"]["num_classes"] == 10
