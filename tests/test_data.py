"""The data pipeline: listing, determinism, resume, sharding, mixing math, RandAugment noise, bad files, demo set."""
import logging
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from replknet_fn import augment, data
from replknet_fn.config import DEFAULTS, Config
from replknet_fn.data import DataError, DataStats
from replknet_fn.demo_data import CLASS_NAMES, MARKER, ensure_demo_dataset


def recipe(**overrides):
    """The full recipe (the config's defaults) at a tiny size: every augmentation on."""
    return Config(DEFAULTS, **{**dict(batch_size=4, image_resize=16, ratio=(3 / 4, 4 / 3), seed=3,
                                      num_parallel_workers=0), **overrides})


def plain(**overrides):
    """No random augmentation and no mixing: targets are one-hot, so with one class per sample they name it."""
    return recipe(**{**dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, auto_augment=None, color_jitter=0,
                            re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0), **overrides})


def write_image(path, size=(24, 20), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return str(path)


def image_samples(tmp_path, count, num_classes=None):
    """`count` distinct small images; label = index unless num_classes is given."""
    return [(write_image(tmp_path / f"{index:03d}.png", seed=index),
             index if num_classes is None else index % num_classes) for index in range(count)]


def one_sample_per_class(tmp_path, count):
    return image_samples(tmp_path, count), count


def no_worker_processes_left():
    deadline = time.time() + 5
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


# --------------------------------------------------------------------------------------------------------------
# Listing

def test_list_image_folder_sorts_classes_and_files_and_filters_extensions(tmp_path):
    for relative in ["b/2.JPG", "b/1.png", "a/x/3.webp", "a/1.TIFF", "a/notes.txt", "a/.hidden.jpg", ".cache/4.jpg"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    samples, class_names = data.list_image_folder(str(tmp_path))
    assert class_names == ["a", "b"]
    assert [(os.path.relpath(path, tmp_path), label) for path, label in samples] == [
        ("a/1.TIFF", 0), ("a/x/3.webp", 0), ("b/1.png", 1), ("b/2.JPG", 1)]


def test_find_splits_returns_both_splits_with_shared_class_names(tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            write_image(tmp_path / split / name / "0.png")
    train, val, class_names = data.find_splits(str(tmp_path))
    assert class_names == ["cat", "dog"] and [label for _, label in train] == [0, 1] == [label for _, label in val]


def test_find_splits_names_a_missing_data_dir_or_split(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.find_splits(str(tmp_path / "nowhere"))
    write_image(tmp_path / "train" / "cat" / "0.png")
    with pytest.raises(DataError, match="no val/ folder"):
        data.find_splits(str(tmp_path))
    os.rename(tmp_path / "train", tmp_path / "val")
    with pytest.raises(DataError, match="no train/ folder"):
        data.find_splits(str(tmp_path))


def test_find_splits_lists_class_folders_that_differ(tmp_path):
    for split, names in (("train", ("cat", "dog", "emu")), ("val", ("cat", "dog", "fox"))):
        for name in names:
            write_image(tmp_path / split / name / "0.png")
    with pytest.raises(DataError, match=r"only in train/: \['emu'\]; only in val/: \['fox'\]"):
        data.find_splits(str(tmp_path))


def test_find_splits_rejects_a_split_without_images(tmp_path):
    write_image(tmp_path / "train" / "cat" / "0.png")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        data.find_splits(str(tmp_path))


def test_find_splits_warns_about_an_empty_class_folder(tmp_path, caplog):
    for split in ("train", "val"):
        write_image(tmp_path / split / "cat" / "0.png")
        (tmp_path / split / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="replknet_fn.data"):
        train, _, class_names = data.find_splits(str(tmp_path))
    assert class_names == ["cat", "empty"] and len(train) == 1
    assert "empty" in caplog.text and "no images" in caplog.text


# --------------------------------------------------------------------------------------------------------------
# Determinism, resume, sharding

def collect(batches):
    return [tuple(np.copy(part) for part in batch) for batch in batches]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for batch_a, batch_b in zip(first, second):
        for part_a, part_b in zip(batch_a, batch_b):
            np.testing.assert_array_equal(part_a, part_b)


def test_training_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    samples = image_samples(tmp_path, 20, num_classes=5)
    in_process = collect(data.train_batches(samples, 5, recipe(num_parallel_workers=0), epoch=1))
    for workers in (2, 3):
        assert_same_batches(in_process, collect(data.train_batches(samples, 5, recipe(num_parallel_workers=workers),
                                                                   epoch=1)))
    assert len(in_process) == 5 and in_process[0][0].shape == (4, 3, 16, 16) and in_process[0][1].shape == (4, 5)
    assert in_process[0][0].dtype == np.float32 and in_process[0][1].dtype == np.float32


def test_epochs_and_seeds_change_the_batches(tmp_path):
    samples = image_samples(tmp_path, 8, num_classes=2)
    first = collect(data.train_batches(samples, 2, recipe(), epoch=0))
    assert not np.array_equal(first[0][0], collect(data.train_batches(samples, 2, recipe(), epoch=1))[0][0])
    assert not np.array_equal(first[0][0], collect(data.train_batches(samples, 2, recipe(seed=4), epoch=0))[0][0])


def test_resuming_at_start_batch_gives_the_rest_of_the_uninterrupted_epoch(tmp_path):
    samples = image_samples(tmp_path, 22, num_classes=3)
    for rank in (0, 1):
        whole = collect(data.train_batches(samples, 3, recipe(), epoch=2, rank=rank, world_size=2))
        resumed = collect(data.train_batches(samples, 3, recipe(num_parallel_workers=2), epoch=2, rank=rank,
                                             world_size=2, start_batch=1))
        assert len(whole) == data.num_train_batches(22, 4, 2) == 2
        assert_same_batches(whole[1:], resumed)


def sample_ids(batches):
    return [int(index) for _, targets in batches for index in targets.argmax(axis=1)]


def test_two_ranks_take_disjoint_equal_shards_that_cover_the_epoch(tmp_path):
    samples, num_classes = one_sample_per_class(tmp_path, 12)
    shards = [sample_ids(data.train_batches(samples, num_classes, plain(batch_size=3), epoch=5, rank=rank,
                                            world_size=2)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(12))
    order = data.epoch_order(12, seed=3, epoch=5)
    assert shards[0] == list(order[0::2]) and shards[1] == list(order[1::2])


def test_uneven_shards_are_padded_by_wrapping_to_the_same_number_of_full_batches(tmp_path):
    samples, num_classes = one_sample_per_class(tmp_path, 13)
    order = data.epoch_order(13, seed=3, epoch=0)
    for world_size, batch_size in ((2, 7), (2, 3), (3, 2)):
        shards = [sample_ids(data.train_batches(samples, num_classes, plain(batch_size=batch_size), epoch=0,
                                                rank=rank, world_size=world_size)) for rank in range(world_size)]
        for rank, shard in enumerate(shards):
            assert len(shard) == data.num_train_batches(13, batch_size, world_size) * batch_size
            assert shard == [order[position % 13] for position in data.train_positions(13, batch_size, rank,
                                                                                      world_size)]
        if (world_size, batch_size) == (2, 7):  # 13 padded to 14: everything once, the first sample twice
            assert sorted(shards[0] + shards[1]) == sorted(list(range(13)) + [order[0]])


@pytest.mark.parametrize("count, world_size", [(7, 2), (13, 2), (13, 3), (2, 3)])
def test_evaluation_counts_every_image_exactly_once(tmp_path, count, world_size):
    samples = image_samples(tmp_path, count)
    config = plain(batch_size=3, num_parallel_workers=2 if count == 13 else 0)
    seen = []
    for rank in range(world_size):
        batches = collect(data.eval_batches(samples, config, rank, world_size))
        assert len(batches) == data.num_eval_batches(count, 3, world_size)
        for images, labels, valid in batches:
            assert images.shape == (3, 3, 16, 16) and labels.dtype == np.int32 and valid.dtype == np.float32
            seen += [int(label) for label, flag in zip(labels, valid) if flag == 1]
    assert sorted(seen) == list(range(count))


def test_eval_transform_resizes_the_shorter_side_then_centre_crops(tmp_path):
    image = Image.open(write_image(tmp_path / "wide.png", size=(100, 50))).convert("RGB")
    expected = image.resize((int(36 * 100 / 50), 36), Image.BICUBIC).crop((20, 2, 52, 34))  # 36 = floor(32 / .875)
    np.testing.assert_allclose(augment.eval_transform(image, 32, 0.875, "bicubic"), augment.normalize(expected))
    gray = Image.new("RGB", (5, 5), tuple(round(255 * m) for m in augment.IMAGENET_MEAN))
    assert np.abs(augment.eval_transform(gray, 8, 0.875)).max() < 0.01


# --------------------------------------------------------------------------------------------------------------
# Mixing and label smoothing

def test_soft_targets_match_the_closed_form():
    labels, lam, smoothing, num_classes = np.array([0, 2, 3]), 0.3, 0.1, 4
    off, on = smoothing / num_classes, 1 - smoothing + smoothing / num_classes
    smoothed = np.full((3, 4), off)
    smoothed[[0, 1, 2], labels] = on
    expected = lam * smoothed + (1 - lam) * smoothed[::-1]
    targets = augment.soft_targets(labels, num_classes, lam, smoothing)
    np.testing.assert_allclose(targets, expected, atol=1e-7)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(augment.soft_targets(labels, 4, 1.0, 0.0), np.eye(4)[labels])


def lam_from_targets(targets, unmixed_targets):
    """Solve targets = lam * t + (1 - lam) * flip(t) for lam by least squares."""
    difference = unmixed_targets - unmixed_targets[::-1]
    return float(((targets - unmixed_targets[::-1]) * difference).sum() / (difference * difference).sum())


def test_training_mixup_mixes_images_and_smoothed_targets_with_the_same_lambda(tmp_path):
    samples = image_samples(tmp_path, 16, num_classes=4)
    mixed = collect(data.train_batches(samples, 4, recipe(mixup=0.8, cutmix=0.0), epoch=0))
    unmixed = collect(data.train_batches(samples, 4, recipe(mixup=0.0, cutmix=0.0), epoch=0))
    lams = []
    for (images, targets), (plain_images, plain_targets) in zip(mixed, unmixed):
        lam = lam_from_targets(targets, plain_targets)
        lams.append(lam)
        np.testing.assert_allclose(targets, lam * plain_targets + (1 - lam) * plain_targets[::-1], atol=1e-6)
        np.testing.assert_allclose(images, lam * plain_images + (1 - lam) * plain_images[::-1], atol=1e-5)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
        assert np.isclose(plain_targets.max(), 0.9 + 0.1 / 4) and np.isclose(plain_targets.min(), 0.1 / 4)
    assert any(0.01 < lam < 0.99 for lam in lams)


def test_cutmix_pastes_the_flipped_batch_in_a_box_and_lambda_is_the_uncovered_area():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 3, 10, 12)).astype(np.float32)
    (top, bottom, left, right), lam = augment.cutmix_box(np.random.default_rng(1), 10, 12, 0.4)
    assert lam == pytest.approx(1 - (bottom - top) * (right - left) / 120)
    mixed = augment.mix_images(images, lam, (top, bottom, left, right))
    inside = np.zeros((10, 12), bool)
    inside[top:bottom, left:right] = True
    np.testing.assert_array_equal(mixed[:, :, inside], images[::-1][:, :, inside])
    np.testing.assert_array_equal(mixed[:, :, ~inside], images[:, :, ~inside])


def test_sample_mix_follows_timm_switching():
    def draws(**kwargs):
        rng = np.random.default_rng(0)
        return [augment.sample_mix(rng, **kwargs) for _ in range(2000)]
    assert all(lam == 1.0 for lam, _ in draws(mixup=0.8, cutmix=1.0, mix_prob=0.0))
    assert not any(cut for _, cut in draws(mixup=0.8, cutmix=0.0))
    assert all(cut for _, cut in draws(mixup=0.0, cutmix=1.0))
    both = draws(mixup=0.8, cutmix=1.0, mix_prob=0.6, switch_prob=0.5)
    mixed = [(lam, cut) for lam, cut in both if lam != 1.0]
    assert len(mixed) / len(both) == pytest.approx(0.6, abs=0.04)
    assert np.mean([cut for _, cut in mixed]) == pytest.approx(0.5, abs=0.05)
    assert np.mean([lam for lam, _ in mixed]) == pytest.approx(0.5, abs=0.03)  # Beta(a, a) has mean 1/2


# --------------------------------------------------------------------------------------------------------------
# RandAugment and the per-image transforms

def test_rand_augment_strings_parse_as_timm():
    rand_augment = augment.parse_rand_augment("randaug-m9-mstd0.5")
    assert (rand_augment.magnitude, rand_augment.magnitude_std, rand_augment.num_layers,
            rand_augment.op_prob) == (9, 0.5, 2, 0.5)
    assert rand_augment.ops == augment.RAND_AUGMENT_OPS and rand_augment.fill == (124, 116, 104)
    rand_augment = augment.parse_rand_augment("rand-m7-n3-mstd101-inc1-mmax12")
    assert (rand_augment.magnitude, rand_augment.num_layers, rand_augment.magnitude_max) == (7, 3, 12)
    assert rand_augment.magnitude_std == float("inf") and rand_augment.ops == augment.RAND_AUGMENT_INCREASING_OPS
    with pytest.raises(DataError, match="unknown section 'q3'"):
        augment.parse_rand_augment("randaug-m9-q3")
    with pytest.raises(DataError, match="only RandAugment"):
        augment.parse_rand_augment("v0")


def test_rand_augment_magnitude_noise_has_the_configured_std():
    rng = np.random.default_rng(0)
    noisy = np.array([augment.parse_rand_augment("randaug-m5-mstd0.5").sample_magnitude(rng)
                      for _ in range(20000)])
    assert noisy.mean() == pytest.approx(5.0, abs=0.02) and noisy.std() == pytest.approx(0.5, abs=0.02)
    fixed = [augment.parse_rand_augment("randaug-m9").sample_magnitude(rng) for _ in range(100)]
    assert set(fixed) == {9.0}
    clipped = [augment.parse_rand_augment("randaug-m10-mstd2").sample_magnitude(rng) for _ in range(1000)]
    assert max(clipped) == 10.0 and min(clipped) < 9
    uniform = np.array([augment.parse_rand_augment("randaug-m9-mstd1000").sample_magnitude(rng)
                        for _ in range(5000)])
    assert uniform.min() >= 0 and uniform.max() <= 9 and uniform.mean() == pytest.approx(4.5, abs=0.15)


def test_every_rand_augment_op_runs_and_keeps_the_size(tmp_path):
    image = Image.open(write_image(tmp_path / "x.png", size=(17, 13))).convert("RGB")
    rng = np.random.default_rng(0)
    for name in set(augment.RAND_AUGMENT_OPS + augment.RAND_AUGMENT_INCREASING_OPS):
        for magnitude in (0.0, 5.0, 10.0):
            out = augment.apply_augment_op(image, name, augment._op_argument(name, magnitude, rng))
            assert out.size == image.size and out.mode == "RGB", name


def test_colour_jitter_is_skipped_when_auto_augment_is_on_as_in_timm():
    assert augment.AugmentSettings.from_config(recipe()).jitter_strengths() is None
    assert augment.AugmentSettings.from_config(recipe(auto_augment="")).jitter_strengths() == (0.4, 0.4, 0.4, 0.0)
    assert augment.AugmentSettings.from_config(recipe(auto_augment=None, color_jitter=0)).jitter_strengths() is None


def test_bad_settings_are_named():
    with pytest.raises(DataError, match=r"hflip=1.5 is not in \[0, 1\]"):
        data.train_batches([("x", 0)] * 8, 1, recipe(hflip=1.5), epoch=0)
    with pytest.raises(DataError, match="interpolation='cubic'"):
        data.train_batches([("x", 0)] * 8, 1, recipe(interpolation="cubic"), epoch=0)
    with pytest.raises(DataError, match="unknown section 'm'"):
        data.train_batches([("x", 0)] * 8, 1, recipe(auto_augment="randaug-m-mstd0.5"), epoch=0)
    with pytest.raises(DataError, match="do not fill one batch"):
        data.train_batches([("x", 0)] * 3, 1, recipe(), epoch=0)


def test_settings_take_every_value_from_the_config_and_name_a_missing_key():
    settings = data.TrainSettings.from_config(Config(DEFAULTS))
    assert (settings.seed, settings.num_parallel_workers, settings.augment.ratio) == (42, 2, (0.75, 1.333))
    without_crop_pct = Config(DEFAULTS)
    del without_crop_pct["crop_pct"]
    with pytest.raises(DataError, match="the config has no crop_pct"):
        data.eval_batches([("x", 0)], without_crop_pct)


def test_random_resized_crop_falls_back_to_a_centre_crop_clamped_to_the_ratio():
    tall = Image.new("RGB", (3, 200))
    rng = np.random.default_rng(0)
    assert augment.random_resized_crop(tall, rng, 8, scale=(0.9, 1.0)).size == (8, 8)


# --------------------------------------------------------------------------------------------------------------
# Bad data

@pytest.fixture
def odd_files(tmp_path):
    """Each kind of file a real dataset contains: decodable odd modes and sizes, and undecodable files."""
    folder = tmp_path / "odd"
    folder.mkdir()
    good = write_image(folder / "good.jpg", size=(30, 30))
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(open(good, "rb").read()[:200])
    (folder / "text.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    decodable = {
        "gray.jpg": write_image(folder / "gray.jpg", mode="L"),
        "cmyk.jpg": write_image(folder / "cmyk.jpg", mode="CMYK"),
        "rgba.png": write_image(folder / "rgba.png", mode="RGBA"),
        "palette.png": write_image(folder / "palette.png", mode="P"),
        "one_pixel.png": write_image(folder / "one_pixel.png", size=(1, 1)),
        "thin.png": write_image(folder / "thin.png", size=(3, 200)),
        "flat.png": write_image(folder / "flat.png", size=(200, 3)),
    }
    transparent = Image.new("P", (9, 9), 1)
    transparent.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    transparent.save(folder / "palette_transparency.png", transparency=1)
    decodable["palette_transparency.png"] = str(folder / "palette_transparency.png")
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(folder / "sixteen_bit.png")
    decodable["sixteen_bit.png"] = str(folder / "sixteen_bit.png")
    bad = [str(folder / name) for name in ("truncated.jpg", "text.jpg", "empty.png")]
    return good, decodable, bad


def test_load_rgb_converts_every_decodable_mode_to_rgb(odd_files):
    _, decodable, _ = odd_files
    for name, path in decodable.items():
        image = data.load_rgb(path)
        assert image.mode == "RGB", name
    assert data.load_rgb(decodable["sixteen_bit.png"]).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257
    assert data.load_rgb(decodable["palette_transparency.png"]).getpixel((0, 0)) == (250, 10, 10)
    assert data.load_rgb(decodable["thin.png"]).size == (3, 200)


def test_load_rgb_names_the_file_that_does_not_decode(odd_files):
    for path in odd_files[2]:
        with pytest.raises(DataError, match=f"cannot decode image file {path}"):
            data.load_rgb(path)


def test_tiny_and_extreme_images_go_through_train_and_eval_transforms(odd_files):
    _, decodable, _ = odd_files
    settings = augment.AugmentSettings.from_config(recipe())
    for name in ("one_pixel.png", "thin.png", "flat.png"):
        image = data.load_rgb(decodable[name])
        for seed in range(5):
            chw = augment.train_transform(image, np.random.default_rng(seed), settings, settings.rand_augment())
            assert chw.shape == (3, 16, 16) and np.isfinite(chw).all()
        assert augment.eval_transform(image, 16, 0.875).shape == (3, 16, 16)


def test_scan_images_lists_exactly_the_files_that_do_not_decode(odd_files):
    good, decodable, bad = odd_files
    paths = [good, *decodable.values(), *bad]
    for workers in (0, 2):
        failures = data.scan_images([(path, 0) for path in paths], num_workers=workers)
        assert [path for path, _ in failures] == bad
        assert all(path in error for path, error in failures)


def test_training_replaces_bad_files_counts_them_and_warns_once(odd_files, caplog):
    good, decodable, bad = odd_files
    samples = [(path, index % 3) for index, path in enumerate([good] * 4 + [*decodable.values(), *bad])]
    assert len(samples) % 4 == 0
    stats = DataStats()
    with caplog.at_level(logging.WARNING, logger="replknet_fn.data"):
        first = collect(data.train_batches(samples, 3, recipe(), epoch=0, stats=stats))
        assert stats.skipped == len(bad) and sorted(stats.bad_files) == sorted(bad)
        stats.skipped = 0
        parallel_stats = DataStats()
        assert_same_batches(first, collect(data.train_batches(samples, 3, recipe(num_parallel_workers=2), epoch=0,
                                                              stats=parallel_stats)))
        data.train_batches(samples, 3, recipe(), epoch=0, stats=stats)  # not iterated: nothing happens
        collect(data.train_batches(samples, 3, recipe(), epoch=1, stats=stats))
    assert parallel_stats.skipped == stats.skipped == len(bad)
    assert len(first) == len(samples) // 4 and all(np.isfinite(images).all() for images, _ in first)
    for path in bad:  # once for this run's stats, once for parallel_stats
        assert sum(path in record.getMessage() for record in caplog.records) == 2


def test_evaluation_leaves_out_bad_files_with_mask_zero_and_counts_them(odd_files):
    good, decodable, bad = odd_files
    samples = [(path, index) for index, path in enumerate([good, *bad, *decodable.values()])]
    stats = DataStats()
    valid_labels = [int(label) for _, labels, valid in data.eval_batches(samples, plain(batch_size=4), stats=stats)
                    for label, flag in zip(labels, valid) if flag]
    assert valid_labels == [0] + list(range(1 + len(bad), len(samples)))
    assert stats.skipped == len(bad)


def test_a_dataset_where_nothing_decodes_fails_with_the_error_also_from_workers(odd_files):
    bad = [(path, 0) for path in odd_files[2] * 4]
    for workers in (0, 2):
        with pytest.raises(DataError, match="none of the 12 training images decodes"):
            collect(data.train_batches(bad, 1, recipe(num_parallel_workers=workers), epoch=0))
    assert no_worker_processes_left()


# --------------------------------------------------------------------------------------------------------------
# Worker processes shut down

def test_workers_stop_when_the_consumer_stops_early_or_raises(tmp_path):
    samples = image_samples(tmp_path, 40, num_classes=2)
    batches = data.train_batches(samples, 2, recipe(num_parallel_workers=2), epoch=0)
    next(batches)
    assert len(multiprocessing.active_children()) == 2
    batches.close()
    assert no_worker_processes_left()
    for _ in data.eval_batches(samples, recipe(num_parallel_workers=2)):
        break
    assert no_worker_processes_left()
    with pytest.raises(KeyError):
        for _ in data.train_batches(samples, 2, recipe(num_parallel_workers=2), epoch=0):
            raise KeyError("the training step failed")
    assert no_worker_processes_left()


WORKER_ORPHAN_SCRIPT = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from replknet_fn import data
from replknet_fn.config import DEFAULTS, Config
samples = [(sys.argv[2], 0)] * 64
config = Config(DEFAULTS, batch_size=2, image_resize=64, num_parallel_workers=2)
batches = data.train_batches(samples, 2, config, epoch=0)
next(batches)
import multiprocessing
print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
time.sleep(60)
"""


def test_workers_exit_by_themselves_when_the_training_process_is_killed(tmp_path):
    image = write_image(tmp_path / "x.png", size=(80, 80))
    package_root = os.path.dirname(os.path.dirname(data.__file__))
    process = subprocess.Popen([sys.executable, "-c", WORKER_ORPHAN_SCRIPT, package_root, image],
                               stdout=subprocess.PIPE, text=True)
    worker_pids = [int(pid) for pid in process.stdout.readline().split()]
    assert len(worker_pids) == 2
    process.kill()
    process.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") and
                                         "zombie" not in open(f"/proc/{pid}/status").read().lower()
                                         for pid in worker_pids):
        time.sleep(0.1)
    still_running = [pid for pid in worker_pids if os.path.exists(f"/proc/{pid}")
                     and "zombie" not in open(f"/proc/{pid}/status").read().lower()]
    assert not still_running


# --------------------------------------------------------------------------------------------------------------
# Demo dataset

def file_bytes(root):
    return {os.path.relpath(os.path.join(folder, name), root): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(root) for name in names}


def test_demo_dataset_is_deterministic_complete_and_generated_once(tmp_path):
    first = ensure_demo_dataset(tmp_path / "a", num_train_per_class=3, num_val_per_class=2, image_size=32)
    second = ensure_demo_dataset(tmp_path / "b", num_train_per_class=3, num_val_per_class=2, image_size=32)
    assert file_bytes(first) == file_bytes(second)
    train, val, class_names = data.find_splits(first)
    assert class_names == list(CLASS_NAMES) and len(train) == 3 * len(CLASS_NAMES) and len(val) == 16
    assert data.load_rgb(train[0][0]).size == (32, 32)
    marker_time = os.stat(os.path.join(first, MARKER)).st_mtime_ns
    assert ensure_demo_dataset(first, num_train_per_class=3, num_val_per_class=2, image_size=32) == first
    assert os.stat(os.path.join(first, MARKER)).st_mtime_ns == marker_time
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_an_interrupted_demo_generation_is_not_taken_for_a_finished_one(tmp_path):
    abandoned = tmp_path / ".demo.tmp-999999999"  # as left by a generation killed mid-way (no such pid)
    (abandoned / "train" / "circle").mkdir(parents=True)
    root = ensure_demo_dataset(tmp_path / "demo", num_train_per_class=1, num_val_per_class=1, image_size=16)
    assert os.path.exists(os.path.join(root, MARKER)) and not abandoned.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's folder")
    with pytest.raises(FileExistsError, match="not a generated demo dataset"):
        ensure_demo_dataset(tmp_path / "mine", num_train_per_class=1, num_val_per_class=1, image_size=16)
