"""Per-token figures: labels from a real tokenizer, one annotated cell per (row, token), colour scales, errors."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tokenpo import plots  # noqa: E402
from tokenpo.models import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"the {a} car was {b}\nand the {a} ride was {b}" for a in ("old", "new", "fast") for b in ("great", "bad")]
    return train_tokenizer(texts * 4, vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


def test_token_labels_show_spaces_newlines_and_eos(tokenizer):
    ids = tokenizer(" the car\nwas", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = plots.token_labels(tokenizer, ids)
    assert len(labels) == len(ids) and labels[-1] == "EOS"
    assert "".join(labels[:-1]).replace("␣", " ").replace("⏎", "\n") == " the car\nwas"
    assert labels[0].startswith("␣") and any("⏎" in label for label in labels)


def test_token_heatmap_annotates_every_cell_and_scales_rows():
    tokens = ["␣a", "b", "EOS"]
    rows = {"reward": [-0.5, 0.25, -0.0], "kl": [1.0, 4.0, float("nan")]}
    fig = plots.token_heatmap(tokens, rows)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["-0.5", "0.25", "0", "1", "4"]              # NaN left blank, no "-0"
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    colours = ax.images[0].get_array()
    assert colours[0, 0] == pytest.approx(-1.0) and colours[1, 1] == pytest.approx(1.0)   # each row on its own scale
    assert colours[1, 0] == pytest.approx(0.25)
    plt.close(fig)
    with pytest.raises(ValueError, match="one value per token"):
        plots.token_heatmap(tokens, {"reward": [1.0, 2.0]})


def test_token_heatmaps_and_bars(tmp_path):
    panels = {"chosen": (["a", "b"], {"x": [1.0, -1.0]}), "rejected": (["c", "d", "e"], {"x": [0.0, 1.0, 2.0],
                                                                                      "y": [1.0, 1.0, 1.0]})}
    fig = plots.token_heatmaps(panels, title="t")
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["chosen", "rejected"]
    assert plots.save(fig, tmp_path, "panels").stat().st_size > 0
    fig = plots.labelled_bars(["dpo", "ipo"], [0.2, 17.0], log=True)
    assert fig.axes[0].get_xscale() == "log"
    assert [t.get_text().strip() for t in fig.axes[0].texts] == ["0.2", "17"]
    plt.close("all")
    with pytest.raises(ValueError, match="values > 0"):
        plots.labelled_bars(["a"], [0.0], log=True)
