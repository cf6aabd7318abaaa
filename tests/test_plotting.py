"""util/plotting.py: the per-image curves have two labelled series (after data consistency, after purification)
against the round k, counted from 1."""
import numpy as np
import pytest
from PIL import Image

from util import plotting
from util.plotting import SERIES, save_metric_curves, split_rounds


def captured_figure(monkeypatch):
    """Replace the PNG writer so that the test sees the Figure; returns a dict that receives it."""
    seen = {}
    save = plotting._save

    def spy(fig, path):
        seen["fig"] = fig
        save(fig, path)

    monkeypatch.setattr(plotting, "_save", spy)
    return seen


def test_two_labelled_series_per_panel_against_the_round(tmp_path, monkeypatch):
    seen = captured_figure(monkeypatch)
    psnr = [18.0, 19.5, 19.0, 20.5, 20.0, 21.5]  # K = 3 rounds: (after DC, after purification) each
    ssim = [0.40, 0.45, 0.47, 0.52, 0.55, 0.60]
    save_metric_curves(psnr, ssim, None, tmp_path / "img_metrics.png", title="00042.png")
    image = Image.open(tmp_path / "img_metrics.png")
    assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 300

    fig = seen["fig"]
    assert fig.get_suptitle() == "00042.png"
    assert [ax.get_title() for ax in fig.axes] == ["PSNR (dB)", "SSIM"]
    for ax, values in zip(fig.axes, (psnr, ssim)):
        assert ax.get_xlabel() == "round k"
        dc, purified = ax.get_lines()
        assert list(dc.get_xdata()) == [1, 2, 3] and list(purified.get_xdata()) == [1, 2, 3]  # 1-based rounds
        assert list(dc.get_ydata()) == values[0::2] and list(purified.get_ydata()) == values[1::2]
        assert all(float(t).is_integer() for t in ax.get_xticks() if 0.5 <= t <= 3.5)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == list(SERIES) == ["after data consistency",
                                                                          "after purification"]


def test_the_positional_signature_and_an_lpips_panel(tmp_path, monkeypatch):
    seen = captured_figure(monkeypatch)
    save_metric_curves([10.0, 12.5, 14.0, 15.0], [0.2, 0.4, 0.5, 0.6], [0.6, 0.5, 0.4, 0.3], tmp_path / "m.png",
                       "deblur")
    assert [ax.get_title() for ax in seen["fig"].axes] == ["PSNR (dB)", "SSIM", "LPIPS"]
    assert seen["fig"].get_suptitle() == "deblur"
    save_metric_curves(np.array([10.0, 12.5]), np.array([0.2, 0.4]), None, tmp_path / "m2.png")  # K = 1, no title
    assert seen["fig"].get_suptitle() == ""
    assert Image.open(tmp_path / "m.png").size[0] > Image.open(tmp_path / "m2.png").size[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "m2.png"]  # atomic: no temporary files left


def test_odd_lengths_are_a_last_round_without_purification(tmp_path, monkeypatch):
    seen = captured_figure(monkeypatch)
    dc, purified = split_rounds([1.0, 2.0, 3.0, 4.0, 5.0])
    assert list(dc) == [1.0, 3.0, 5.0] and list(purified) == [2.0, 4.0]
    save_metric_curves([18.0, 19.0, 20.0], [0.4, 0.5, 0.6], None, tmp_path / "odd.png", title="stopped")
    lines = seen["fig"].axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[1, 2], [1]]
    assert (tmp_path / "odd.png").is_file()


def test_lists_of_different_lengths_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"cannot plot '.*bad\.png': the metric lists differ in length "
                                         r"\(\{'PSNR \(dB\)': 4, 'SSIM': 3\}\)"):
        save_metric_curves([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3], None, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="expected a flat list of per-round values"):
        save_metric_curves([[1.0, 2.0]], [[0.1, 0.2]], None, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
