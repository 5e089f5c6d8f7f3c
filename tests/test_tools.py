"""Deployment and analysis tools (issue 6): MindIR export of the deploy network and ERF maps."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from PIL import Image

from replknet_fn import build_replknet, erf, export, replknet_tiny
from replknet_fn.checkpoint import CheckpointError
from replknet_fn.reparam import reparameterize
from replknet_fn.weights import load_network_weights

TOLERANCE = 1e-5
IMAGE_SIZE = 32


def randomize(net, seed=0):
    """Random weights and BN statistics, so that re-parameterization has real work to do."""
    rng = np.random.default_rng(seed)
    for name, param in net.parameters_and_names():
        if name.endswith(("moving_variance", "gamma")):
            value = rng.uniform(0.5, 1.5, param.shape)
        else:
            value = rng.normal(0.0, 0.2, param.shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))
    net.set_train(False)
    return net


def small_net():
    return randomize(build_replknet([7, 5], [1, 1], [8, 16], num_classes=4))


def logits(net, batch_size, seed=1):
    x = np.random.default_rng(seed).standard_normal((batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    return ms.Tensor(x), net(ms.Tensor(x)).asnumpy()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A replknet_tiny training checkpoint that also holds optimizer moments and metadata."""
    net = randomize(replknet_tiny())
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    moments = {f"moment1.{name}": ms.Parameter(param.asnumpy() * 0, name=f"moment1.{name}")
               for name, param in net.parameters_and_names()}
    ms.save_checkpoint(net, str(path), append_dict=dict(moments, epoch=7, classes="cat,dog"))
    return net, path


# ---- export ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fold_all", [False, True], ids=["reparam", "fully_folded"])
def test_exported_mindir_gives_the_training_networks_eval_logits(tmp_path, fold_all):
    net = small_net()
    path = export.export_deploy(net, tmp_path / "net", image_size=IMAGE_SIZE, fold_all=fold_all)
    assert path.endswith(".mindir")
    x, expected = logits(net, 1)
    actual = nn.GraphCell(ms.load(path))(x).asnumpy()
    assert export.relative_difference(actual, expected) < TOLERANCE


def test_dynamic_batch_mindir_accepts_two_batch_sizes(tmp_path):
    net = small_net()
    graph = nn.GraphCell(ms.load(export.export_deploy(net, tmp_path / "net.mindir", IMAGE_SIZE, dynamic_batch=True)))
    for batch_size in (1, 3):
        x, expected = logits(net, batch_size)
        actual = graph(x).asnumpy()
        assert actual.shape == (batch_size, 4)
        assert export.relative_difference(actual, expected) < TOLERANCE


def test_export_cli_ignores_optimizer_state_and_checks_the_file(tiny_ckpt, tmp_path, capsys):
    _, ckpt = tiny_ckpt
    out = tmp_path / "tiny"
    export.main(["--model", "replknet_tiny", "--ckpt", str(ckpt), "--format", "MINDIR", "--image_size", "64",
                 "--dynamic_batch", "--out", str(out)])
    printed = capsys.readouterr().out
    assert (tmp_path / "tiny.mindir").exists()
    assert "max relative difference" in printed
    difference = float(printed.split("max relative difference ")[1].split()[0])
    assert difference < TOLERANCE


def test_export_cli_accepts_a_deploy_form_checkpoint(tiny_ckpt, tmp_path):
    net, _ = tiny_ckpt
    ckpt = tmp_path / "tiny_deploy.ckpt"
    ms.save_checkpoint(reparameterize(net), str(ckpt))
    export.main(["--model", "replknet_tiny", "--ckpt", str(ckpt), "--image_size", "64", "--out", str(tmp_path / "d")])
    graph = nn.GraphCell(ms.load(str(tmp_path / "d.mindir")))
    x = ms.Tensor(np.random.default_rng(2).standard_normal((1, 3, 64, 64), dtype=np.float32))
    assert export.relative_difference(graph(x).asnumpy(), net(x).asnumpy()) < TOLERANCE


def test_export_cli_fails_naming_the_mismatched_parameter(tmp_path):
    wrong = tmp_path / "wrong.ckpt"
    ms.save_checkpoint(build_replknet([13, 11, 9, 7], [1, 1, 2, 1], [16, 32, 48, 128], num_classes=10), str(wrong))
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--model", "replknet_tiny", "--ckpt", str(wrong), "--out", str(tmp_path / "x")])
    message = str(exit_info.value.code)
    assert "shape mismatch for 'stages.2." in message
    assert "(48,)" in message and "(64,)" in message
    assert not (tmp_path / "x.mindir").exists()


def test_loading_weights_names_the_first_missing_parameter(tiny_ckpt):
    net, ckpt = tiny_ckpt
    entries = ms.load_checkpoint(str(ckpt))
    del entries["stages.1.blocks.0.pw1.conv.weight"], entries["head.bias"]
    with pytest.raises(CheckpointError, match=r"'stages\.1\.blocks\.0\.pw1\.conv\.weight' is not in the "):
        load_network_weights(replknet_tiny(), entries)


def test_onnx_is_refused_with_the_reason(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="Erf"):
        export.main(["--model", "replknet_tiny", "--ckpt", str(tiny_ckpt[1]), "--format", "ONNX"])
    with pytest.raises(ValueError, match="Erf"):
        export.export_deploy(small_net(), tmp_path / "net", IMAGE_SIZE, file_format="ONNX")


# ---- effective receptive field --------------------------------------------------------------------------------

KERNEL = 7
KERNEL_WEIGHT = 0.5


class DepthwiseOnly(nn.Cell):
    """Features = one K x K depthwise conv of constant positive weights: the receptive field of its central
    output is exactly the K x K input square around the centre, and each input pixel there has gradient 0.5."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, KERNEL, pad_mode="pad", padding=KERNEL // 2, group=3, has_bias=False,
                              weight_init="ones")
        self.conv.weight.set_data(self.conv.weight * KERNEL_WEIGHT)

    def forward_features(self, x):
        return self.conv(x)


def positive_images(count, size=IMAGE_SIZE):
    # Positive inputs make the central output positive, so its ReLU passes the gradient.
    return np.random.default_rng(0).uniform(0.1, 1.0, (count, 3, size, size)).astype(np.float32)


def kernel_square(size=IMAGE_SIZE):
    square = np.zeros((size, size))
    centre, half = size // 2, KERNEL // 2
    square[centre - half:centre + half + 1, centre - half:centre + half + 1] = 1
    return square


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "pynative"])
def test_erf_of_one_depthwise_conv_is_exactly_its_kernel_square(jit):
    raw = erf.erf_map(DepthwiseOnly(), positive_images(2), jit=jit)
    # Summed over RGB: 3 channels x weight 0.5 inside the square, 0 elsewhere.
    np.testing.assert_allclose(raw, 3 * KERNEL_WEIGHT * kernel_square(), rtol=1e-6, atol=0)


def test_erf_map_accepts_a_plain_function():
    conv = DepthwiseOnly().conv

    def features(x):
        return conv(x)

    raw = erf.erf_map(features, positive_images(1), jit=False)
    np.testing.assert_array_equal(raw > 0, kernel_square() > 0)


def test_area_ratios_of_the_kernel_square():
    # A uniform 7 x 7 square holds s*s/49 in the centred s x s square: 3x3 holds 9/49 = 0.18 (< 0.2),
    # 5x5 holds 25/49 = 0.51 (> 0.2, 0.3, 0.5), and only the full 7x7 holds more than 0.99.
    ratios = erf.high_contribution_ratios(erf.normalize_erf(3 * KERNEL_WEIGHT * kernel_square()))
    area = IMAGE_SIZE * IMAGE_SIZE
    assert ratios == [(0.2, 5, 25 / area), (0.3, 5, 25 / area), (0.5, 5, 25 / area), (0.99, 7, 49 / area)]


def test_area_ratios_need_more_than_t_inside_the_centred_square():
    # Centre 4, the 8 cells around it 0.5 each (4 in all), the outer 16 cells 0.125 each (2 in all): total 10,
    # so the 1x1, 3x3 and 5x5 squares hold 0.4, 0.8 and 1.0 of it.
    scores = np.full((5, 5), 0.125)
    scores[1:4, 1:4] = 0.5
    scores[2, 2] = 4.0
    ratios = erf.high_contribution_ratios(scores, (0.3, 0.4, 0.5, 0.99))
    assert ratios == [(0.3, 1, 1 / 25), (0.4, 3, 9 / 25), (0.5, 3, 9 / 25), (0.99, 5, 1.0)]


def test_area_ratio_not_reached_inside_the_image_is_reported_as_none():
    scores = np.zeros((4, 4))
    scores[0, 0] = 1.0  # the centred squares of a 4 x 4 map (centre (2, 2)) never include row 0
    assert erf.high_contribution_ratios(scores, (0.5,)) == [(0.5, None, None)]


def test_normalize_erf_is_log10_plus_one_over_its_maximum():
    np.testing.assert_allclose(erf.normalize_erf(np.array([[0.0, 9.0, 99.0]])), [[0.0, 0.5, 1.0]])


def test_png_has_the_layout_size_and_the_colour_map(tmp_path):
    square = kernel_square()
    path = erf.render_png([square], tmp_path / "erf.png", ["square"])
    scale = 256 // IMAGE_SIZE  # small maps are enlarged to 256 px
    assert erf.panel_scale(square.shape) == scale
    image = np.asarray(Image.open(path).convert("RGB"))
    width = 2 * erf.MARGIN + IMAGE_SIZE * scale + erf.COLORBAR_WIDTH
    height = 2 * erf.MARGIN + erf.TITLE_HEIGHT + IMAGE_SIZE * scale
    assert image.shape == (height, width, 3)
    top, left = erf.MARGIN + erf.TITLE_HEIGHT, erf.MARGIN
    centre = IMAGE_SIZE // 2 * scale
    assert (image[top + centre, left + centre] == erf.colorize(1.0)).all()
    assert (image[top, left] == erf.colorize(0.0)).all()


def test_compare_png_is_one_panel_wider(tmp_path):
    square = kernel_square()
    one = Image.open(erf.render_png([square], tmp_path / "one.png")).size
    two = Image.open(erf.render_png([square, square], tmp_path / "two.png")).size
    assert two == (one[0] + 256 + erf.PANEL_GAP, one[1])


def write_images(folder, count, size=48):
    rng = np.random.default_rng(3)
    for index in range(count):
        subfolder = folder / f"class{index % 2}"
        subfolder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(subfolder / f"{index}.png")


def test_images_are_read_in_image_folder_order_and_preprocessed(tmp_path):
    write_images(tmp_path, 3)
    files = erf.list_images(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["class0/0.png", "class0/2.png", "class1/1.png"]
    image = erf.load_image(files[0], 40, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert image.shape == (3, 40, 40) and image.dtype == np.float32
    with Image.open(files[0]) as source:
        pixels = np.asarray(source.convert("RGB").resize((40, 40), Image.BICUBIC), np.float32) / 255
    np.testing.assert_allclose(image, ((pixels - 0.5) / 0.25).transpose(2, 0, 1), rtol=1e-6)
    flat = tmp_path / "class0"
    assert erf.list_images(flat) == files[:2]


def test_erf_cli_writes_maps_and_a_wider_compare_png(tmp_path, capsys):
    write_images(tmp_path / "val", 3)
    out = tmp_path / "erf" / "tiny"
    erf.main(["--model", "replknet_tiny", "--data_dir", str(tmp_path / "val"), "--num_images", "2",
              "--input_size", "64", "--out", str(out), "--compare", "replknet_tiny",
              "--large_kernel_sizes2", "3", "3", "3", "3", "--small_kernel2", "none"])
    printed = capsys.readouterr().out
    raw, raw_compare = np.load(f"{out}.npy"), np.load(f"{out}_compare.npy")
    assert raw.shape == raw_compare.shape == (64, 64)
    assert (raw >= 0).all() and raw.sum() > 0
    assert printed.count("t=0.99") == 2
    assert Image.open(f"{out}.png").size == erf.png_size((64, 64), 2)
