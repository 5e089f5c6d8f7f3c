"""The predict tool (issue 6): validation's preprocessing and top-1, deploy form, class names, bad files, output.

The oracle is validation itself: the network that validate_with_func.py builds, run on `data.eval_batches` of the
same files with the preprocessing the checkpoint was trained with (deliberately not the defaults).
"""
import json
import shutil

import mindspore as ms
import numpy as np
import pytest

from replknet_fn import data, predict, replknet_tiny
from replknet_fn.checkpoint import save_train_state
from replknet_fn.config import DEFAULTS, Config
from replknet_fn.demo_data import ensure_demo_dataset
from replknet_fn.optim import create_optimizer
from replknet_fn.parameters import write_parameter
from replknet_fn.reparam import reparameterize
from replknet_fn.runlog import setup_logging
from replknet_fn.train_state import EMA, TrainState, create_loss_scale
from replknet_fn.weights import network_from_checkpoint

import validate_with_func

# What the checkpoint "was trained with"; predict must pick these up from it. Images are 40 px, so the
# resize to 32 / 0.9 = 35 px and the centre crop both do something.
TRAINED = {"image_resize": 32, "crop_pct": 0.9, "interpolation": "bilinear"}


def randomize(net, seed):
    """He-normal conv weights (activations keep their scale, so features differ clearly between images) and
    random BN statistics and affines (so that re-parameterization has real work to do)."""
    rng = np.random.default_rng(seed)
    for name, param in net.parameters_and_names():
        if name.endswith(("moving_variance", "gamma")):
            write_parameter(param, rng.uniform(0.5, 1.5, param.shape).astype(np.float32))
        elif name.endswith(("moving_mean", "beta")):
            write_parameter(param, rng.normal(0.0, 0.1, param.shape).astype(np.float32))
        elif len(param.shape) == 4:
            fan_in = np.prod(param.shape[1:])
            write_parameter(param, rng.normal(0.0, np.sqrt(2 / fan_in), param.shape).astype(np.float32))


def nearest_centroid_head(net, samples, num_classes):
    """(weight, bias) of a head that classifies the random backbone's pooled features by their nearest class
    centroid (standardized features). A random head gives nearly every image the same class, which would make
    the top-1 comparisons weak; this one gives varied classes with margins far above float32 noise."""
    config = Config(DEFAULTS, batch_size=len(samples), num_parallel_workers=0, **TRAINED)
    images, labels, _ = next(data.eval_batches(samples, config))
    features = net.norm(net.forward_features(ms.Tensor(images))).mean(axis=(2, 3)).asnumpy().astype(np.float64)
    mean, std = features.mean(0), features.std(0) + 1e-6
    centroids = np.stack([((features[labels == c] - mean) / std).mean(0) for c in range(num_classes)])
    weight = centroids / std
    bias = -(weight * mean).sum(1) - 0.5 * (centroids ** 2).sum(1)
    # Logits spread by a few units: probabilities that are neither all 0 nor all 1.
    temperature = (features @ weight.T + bias).std() / 3
    return (weight / temperature).astype(np.float32), (bias / temperature).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = ensure_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train_per_class=1,
                               num_val_per_class=2, image_size=40)
    _, val_samples, class_names = data.find_splits(root)
    return root, val_samples, class_names


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    """A training checkpoint as train_with_func.py writes it: weights, optimizer moments, loss scale, EMA weights
    (different from the weights), drop-path seeds, and the metadata (model, build_args, class names, config)."""
    _, val_samples, class_names = dataset
    config = Config(DEFAULTS, model="replknet_tiny", num_classes=len(class_names), ema=True, **TRAINED)
    ms.set_seed(0)
    net = replknet_tiny(num_classes=len(class_names), drop_path_rate=0.1)
    randomize(net, seed=0)
    net.set_train(False)
    weight, bias = nearest_centroid_head(net, val_samples, len(class_names))
    write_parameter(net.head.weight, weight)
    write_parameter(net.head.bias, bias)
    ema = EMA(net, 0.9)
    ema_head = next(average for average in ema.averages if average.name == "ema.head.weight")
    write_parameter(ema_head, np.roll(weight, 1, axis=0))  # EMA weights that predict other classes
    state = TrainState(net, create_optimizer(net, config), create_loss_scale(config), ema)
    meta = {"model": config.model, "build_args": net.build_args, "class_names": class_names,
            "config": {key: (list(value) if isinstance(value, tuple) else value) for key, value in config.items()}}
    path = tmp_path_factory.mktemp("ckpt") / "replknet_tiny-best.ckpt"
    save_train_state(state, path, meta)
    return path


def validation_logits(ckpt, samples, use_ema=False):
    """Logits of validate_with_func's network on validation's batches (eager, another batch size than predict's)."""
    config = Config(DEFAULTS, batch_size=5, num_parallel_workers=0, **TRAINED)
    net, _ = network_from_checkpoint(ckpt, use_ema=use_ema)
    rows = [net(ms.Tensor(images)).asnumpy()[valid > 0]
            for images, _, valid in data.eval_batches(samples, config)]
    return np.concatenate(rows)


def predicted(net, paths, settings, batch_size=4):
    results = list(predict.predict_files(net, paths, settings, batch_size))
    assert [path for path, _ in results] == list(paths)
    return results


@pytest.fixture(scope="module")
def plain_predictions(checkpoint, dataset):
    _, val_samples, _ = dataset
    net, class_names, settings = predict.load_predictor(checkpoint)
    paths = [path for path, _ in val_samples]
    return class_names, settings, np.stack([probabilities for _, probabilities in predicted(net, paths, settings)])


# ---- preprocessing, top-1, accuracy ----------------------------------------------------------------------------

def test_preprocessing_defaults_to_the_checkpoints_training_config(plain_predictions):
    _, settings, _ = plain_predictions
    assert (settings.image_resize, settings.crop_pct, settings.interpolation) == (32, 0.9, "bilinear")


def test_probabilities_and_top1_equal_the_validation_networks_on_validation_batches(plain_predictions, checkpoint,
                                                                                   dataset):
    _, val_samples, _ = dataset
    _, _, probabilities = plain_predictions
    logits = validation_logits(checkpoint, val_samples)
    assert len(set(logits.argmax(1))) > 1, "the test network should not give every image the same class"
    np.testing.assert_array_equal(probabilities.argmax(1), logits.argmax(1))
    np.testing.assert_allclose(probabilities, predict.softmax(logits), rtol=1e-5, atol=1e-7)


def test_top1_accuracy_equals_validate_with_func(plain_predictions, checkpoint, dataset):
    data_dir, val_samples, _ = dataset
    _, _, probabilities = plain_predictions
    labels = np.array([label for _, label in val_samples])
    accuracy = 100.0 * np.sum(probabilities.argmax(1) == labels) / len(labels)
    metrics = validate_with_func.main(["--data_dir", str(data_dir), "--ckpt_path", str(checkpoint),
                                       "--batch_size", "8", "--num_parallel_workers", "0",
                                       "--image_resize", "32", "--crop_pct", "0.9", "--interpolation", "bilinear"])
    assert metrics["num_samples"] == len(labels) and accuracy == metrics["top1"]


def test_reparam_gives_the_same_top1(plain_predictions, checkpoint, dataset):
    _, val_samples, _ = dataset
    _, _, probabilities = plain_predictions
    net, _, settings = predict.load_predictor(checkpoint, reparam=True)
    assert net.deploy_form == "reparam"
    deploy = np.stack([p for _, p in predicted(net, [path for path, _ in val_samples], settings)])
    np.testing.assert_array_equal(deploy.argmax(1), probabilities.argmax(1))
    np.testing.assert_allclose(deploy, probabilities, rtol=1e-4, atol=1e-6)


def test_use_ema_predicts_with_the_ema_weights(plain_predictions, checkpoint, dataset):
    _, val_samples, _ = dataset
    net, _, settings = predict.load_predictor(checkpoint, use_ema=True, jit=False)
    ema = np.stack([p for _, p in predicted(net, [path for path, _ in val_samples[:4]], settings)])
    np.testing.assert_allclose(ema, predict.softmax(validation_logits(checkpoint, val_samples[:4], use_ema=True)),
                               rtol=1e-5, atol=1e-7)
    assert not np.allclose(ema, plain_predictions[2][:4])


# ---- class names -------------------------------------------------------------------------------------------------

def test_class_names_come_from_the_checkpoint(plain_predictions, dataset):
    class_names, _, probabilities = plain_predictions
    assert class_names == dataset[2]
    best = predict.top_k(probabilities[0], 5, class_names)
    assert len(best) == 5 and best[0]["class"] == class_names[best[0]["index"]]
    assert best[0]["index"] == probabilities[0].argmax()
    assert [entry["probability"] for entry in best] == sorted(probabilities[0], reverse=True)[:5]


@pytest.mark.parametrize("form", ["lines", "json"])
def test_a_labels_file_overrides_the_checkpoints_names(checkpoint, tmp_path, form):
    names = [f"thing {index}" for index in range(8)]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(names) + "\n\n" if form == "lines" else json.dumps(names))
    _, class_names, _ = predict.load_predictor(checkpoint, labels=labels, jit=False)
    assert class_names == names
    assert predict.top_k(np.eye(8)[3], 2, class_names)[0] == {"class": "thing 3", "index": 3, "probability": 1.0}


def test_a_labels_file_of_the_wrong_length_is_refused_with_both_counts(checkpoint, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    with pytest.raises(predict.PredictError, match="has 2 names but the classifier has 8 outputs"):
        predict.load_predictor(checkpoint, labels=labels)


def test_without_names_the_classes_are_their_indices():
    assert [entry["class"] for entry in predict.top_k(np.array([0.1, 0.6, 0.3]), 5, None)] == ["1", "2", "0"]


# ---- checkpoints that do not record their architecture (converted official weights) ---------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A plain `mindspore.save_checkpoint(net)`, as replknet_fn.convert writes, in training and deploy form."""
    net = replknet_tiny(num_classes=4)
    randomize(net, seed=2)
    folder = tmp_path_factory.mktemp("converted")
    ms.save_checkpoint(net, str(folder / "train.ckpt"))
    ms.save_checkpoint(reparameterize(net, fold_all=True), str(folder / "deploy.ckpt"))
    return folder


def test_a_converted_checkpoint_needs_model(converted):
    with pytest.raises(predict.PredictError, match="give --model"):
        predict.load_predictor(converted / "train.ckpt")


def test_a_converted_checkpoint_in_deploy_form_predicts_as_its_training_form(converted, dataset):
    paths = [path for path, _ in dataset[1][:6]]
    results = {}
    for form in ("train", "deploy"):
        net, class_names, settings = predict.load_predictor(converted / f"{form}.ckpt", model="replknet_tiny",
                                                            image_resize=32, jit=False)
        assert class_names is None and settings.image_resize == 32 and settings.crop_pct == 0.875
        results[form] = np.stack([p for _, p in predicted(net, paths, settings)])
    np.testing.assert_allclose(results["deploy"], results["train"], rtol=1e-4, atol=1e-6)


# ---- the command line ------------------------------------------------------------------------------------------

@pytest.fixture
def folder_with_a_corrupt_file(dataset, tmp_path):
    """Two images in nested folders, one file that is not an image, and a non-image file that is not listed."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(dataset[1][0][0], tmp_path / "a" / "first.jpg")
    shutil.copy(dataset[1][5][0], tmp_path / "a" / "b" / "second.JPG")
    (tmp_path / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "a" / "notes.txt").write_text("not an image type: not listed")
    return tmp_path / "a"


def test_cli_json_lines_parse_and_a_corrupt_file_is_named_and_skipped(checkpoint, folder_with_a_corrupt_file,
                                                                     capsys):
    predict.main(["--ckpt", str(checkpoint), "--json", "--top_k", "3", "--num_workers", "0",
                  str(folder_with_a_corrupt_file)])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.strip().splitlines()]
    folder = folder_with_a_corrupt_file
    assert [record["path"] for record in records] == [str(folder / "b" / "second.JPG"), str(folder / "first.jpg")]
    for record in records:
        assert set(record) == {"path", "top_k"} and len(record["top_k"]) == 3
        assert set(record["top_k"][0]) == {"class", "index", "probability"}
        probabilities = [entry["probability"] for entry in record["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-9
    assert f"skipping {folder / 'corrupt.png'}: cannot decode" in err
    assert "2 image(s) predicted, 1 skipped" in err


def test_cli_table_uses_the_labels_file(checkpoint, folder_with_a_corrupt_file, tmp_path, capsys):
    labels = tmp_path / "names.json"
    labels.write_text(json.dumps([f"label-{index}" for index in range(8)]))
    predict.main(["--ckpt", str(checkpoint), "--labels", str(labels), "--num_workers", "0",
                  str(folder_with_a_corrupt_file / "first.jpg")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("first.jpg") and len(lines) == 6
    assert all(line.strip().startswith("label-") and "%" in line for line in lines[1:])


def test_cli_fails_when_no_image_could_be_predicted(checkpoint, folder_with_a_corrupt_file, capsys):
    with pytest.raises(SystemExit) as stopped:
        predict.main(["--ckpt", str(checkpoint), str(folder_with_a_corrupt_file / "corrupt.png")])
    assert stopped.value.code not in (0, None) and "no image could be predicted" in str(stopped.value.code)
    assert "corrupt.png" in capsys.readouterr().err


def test_progress_with_an_eta_goes_to_stderr_for_large_folders_only(capsys):
    setup_logging(stream="stderr")  # as predict.main does
    assert list(predict.with_progress(iter(range(12)), total=12, batch_size=2, every=2)) == list(range(12))
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split("] ", 1)[1].split(",")[0] for line in lines] == ["predict: 4/12 images", "predict: 8/12 images"]
    assert all("ETA" in line for line in lines)
    list(predict.with_progress(iter(range(4)), total=4, batch_size=2, every=2))
    assert capsys.readouterr().err == ""
