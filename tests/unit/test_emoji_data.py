"""`uembed data emoji` on tiny package tarballs made here (tests never download)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from training.data.emoji import EmojiDataError, EmojiOptions, build_emoji_dataset, fetch_package
from training.data.manifest import read_manifest

ARTISTS = ("apple", "google")


def _emoji(i: int, sub: str, name: str, skins: bool = False, category: str = "Objects") -> dict:
    e = {"unified": f"1F{i:03X}", "image": f"1f{i:03x}.png", "name": name.upper(), "short_name": name,
         "short_names": [name], "category": category, "subcategory": sub,
         **{f"has_img_{a}": True for a in ("apple", "google", "twitter", "facebook")}}
    if skins:
        e["skin_variations"] = {"1F3FB": {"unified": f"1F{i:03X}-1F3FB", "image": f"1f{i:03x}-1f3fb.png",
                                          **{f"has_img_{a}": True for a in ARTISTS}}}
    return e


def _package(cache: Path, artist: str, entries: list[dict], version: str = "1.0.0", folder: str | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/emoji.json", json.dumps(entries).encode())
        add("package/README.md", b"not extracted")
        images = [e["image"] for e in entries] + [v["image"] for e in entries
                                                  for v in (e.get("skin_variations") or {}).values()]
        for k, image in enumerate(images):
            png = io.BytesIO()
            shade = (37 * k + (0 if artist == "apple" else 90)) % 256
            Image.new("RGBA", (64, 64), (shade, 255 - shade, 128, 255)).save(png, format="PNG")
            add(f"package/img/{folder or artist}/64/{image}", png.getvalue())
    (cache / f"emoji-datasource-{artist}-{version}.tgz").write_bytes(buf.getvalue())


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    entries = [_emoji(i, f"sub{i % 4}", f"thing {['red', 'blue', 'big'][i % 3]} face", skins=i < 3)
               for i in range(30)]
    entries.append(_emoji(99, "skin-tone", "light skin tone", category="Component"))
    folder = tmp_path / "cache"
    folder.mkdir()
    for artist in ARTISTS:
        _package(folder, artist, entries)
    return folder


def test_builds_manifests_holdout_and_eval_sets(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "emoji"
    paths = build_emoji_dataset(EmojiOptions(out=out, cache=cache, artists=ARTISTS, scenes=5, npm="no-such-npm"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identities"] == 30 and summary["held_out"] == 6  # Component and skin tones left out
    train = read_manifest(paths["train"])
    assert len(train) == 24 * 2  # every training identity by both artists
    held = {r.labels["identity"] for r in read_manifest(paths["browse_query"])}
    assert len(held) == 6 and not held & {r.labels["identity"] for r in train}
    assert all(r.labels["keywords"] for r in train if "keywords" in r.labels)
    assert {"thing", "face"} <= {w for r in train for w in r.labels.get("keywords", [])}
    # browse: the query is one artist's drawing, the gallery holds the other artist's
    q = read_manifest(paths["browse_query"])
    g = read_manifest(paths["browse_gallery"])
    assert len(q) == 6 and len(g) == 6 and not {r.image for r in q} & {r.image for r in g}
    cam = read_manifest(paths["camera_query"])
    assert len(cam) == 6 and all(r.image.suffix == ".jpg" and r.image.exists() for r in cam)
    scenes = read_manifest(paths["scene_query"])
    assert len(scenes) == 5 and all(r.labels["identity"] in held for r in scenes)
    assert len(read_manifest(paths["scene_gallery"])) == 12
    assert not (out / "raw" / "apple" / "package" / "README.md").exists()  # only JSON and PNGs extracted
    moved = tmp_path / "moved"
    out.rename(moved)  # manifests hold relative paths: the dataset folder can move
    assert all(r.image.exists() for r in read_manifest(moved / "eval" / "browse_gallery.jsonl"))


def test_skin_tones_as_identities_and_determinism(cache: Path, tmp_path: Path) -> None:
    a = build_emoji_dataset(EmojiOptions(out=tmp_path / "a", cache=cache, artists=ARTISTS, scenes=3, skin_tones=True))
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["identities"] == 33
    b = build_emoji_dataset(EmojiOptions(out=tmp_path / "b", cache=cache, artists=ARTISTS, scenes=3, skin_tones=True))
    assert a["train"].read_text() == b["train"].read_text()
    assert (tmp_path / "a/eval/camera/00000.jpg").read_bytes() == (tmp_path / "b/eval/camera/00000.jpg").read_bytes()


def test_more_scenes_extend_the_smaller_set(cache: Path, tmp_path: Path) -> None:
    # The scene set grew from 400 to 2,000 queries; its first 400 must stay the earlier set, so
    # results on them stay comparable with every run measured before.
    small = build_emoji_dataset(EmojiOptions(out=tmp_path / "s", cache=cache, artists=ARTISTS, scenes=3))
    large = build_emoji_dataset(EmojiOptions(out=tmp_path / "l", cache=cache, artists=ARTISTS, scenes=7))
    q_small, q_large = read_manifest(small["scene_query"]), read_manifest(large["scene_query"])
    assert len(q_small) == 3 and len(q_large) == 7
    assert [r.labels for r in q_large[:3]] == [r.labels for r in q_small]
    assert all(a.image.read_bytes() == b.image.read_bytes() for a, b in zip(q_small, q_large[:3], strict=True))
    assert small["scene_gallery"].read_text() == large["scene_gallery"].read_text()
    assert EmojiOptions(out=tmp_path, cache=cache).scenes == 2000


def test_missing_npm_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmojiDataError, match="npm is not installed"):
        build_emoji_dataset(EmojiOptions(out=tmp_path / "o", cache=tmp_path / "empty", artists=ARTISTS,
                                         npm="no-such-npm-binary"))


def test_extra_artists_add_training_drawings_only(cache: Path, tmp_path: Path) -> None:
    plain = build_emoji_dataset(EmojiOptions(out=tmp_path / "plain", cache=cache, artists=ARTISTS, scenes=3))
    assert "train_extra" not in plain and not (tmp_path / "plain" / "train_extra.jsonl").exists()
    held = {r.labels["identity"] for r in read_manifest(plain["browse_query"])}
    trained = sorted(i for i in range(25) if f"1F{i:03X}" not in held)
    # An older release (pinned as "messenger" 4.1.0) of emoji 0-24, held-out ones included: one
    # training emoji's code carries FE0F there, another's drawing is flagged as missing.
    old = [_emoji(i, f"sub{i % 4}", "old name") for i in range(25)]
    qualified, flagged = trained[0], trained[1]
    old[qualified] = old[qualified] | {"unified": f"1F{qualified:03X}-FE0F", "image": f"1f{qualified:03x}-fe0f.png"}
    old[flagged] = old[flagged] | {"has_img_messenger": False}
    _package(cache, "messenger", old, version="4.1.0")
    paths = build_emoji_dataset(EmojiOptions(out=tmp_path / "more", cache=cache, artists=ARTISTS, scenes=3,
                                             extra_artists=("messenger",), npm="no-such-npm"))
    # The four-artist manifest and every evaluation set are byte for byte what they are without extras.
    for name in ("train", "browse_query", "browse_gallery", "camera_query", "camera_gallery", "scene_gallery"):
        assert paths[name].read_text() == plain[name].read_text(), name
    train = read_manifest(paths["train"])
    extra = read_manifest(paths["train_extra"])[len(train):]
    expected = {f"1F{i:03X}" for i in trained if i != flagged}
    assert held & {f"1F{i:03X}" for i in range(25)}  # the old release does draw held-out emoji...
    assert {r.labels["identity"] for r in extra} == expected and len(extra) == len(expected)  # ...left out
    assert all("raw/messenger/package/img/messenger/64" in str(r.image) and r.image.exists() for r in extra)
    # the FE0F-qualified old drawing is the current identity's
    assert [r.labels["identity"] for r in extra if r.image.name == f"1f{qualified:03x}-fe0f.png"] == \
        [f"1F{qualified:03X}"]
    # the labels come from the current emoji.json, not the old release's names
    assert not any("old" in r.labels.get("keywords", []) for r in extra)
    summary = json.loads((tmp_path / "more" / "summary.json").read_text())
    assert summary["extra_artists"]["messenger"] == {"package": "emoji-datasource-messenger@4.1.0",
                                                     "train_images": len(expected)}
    rebuilt = build_emoji_dataset(EmojiOptions(out=tmp_path / "more", cache=cache, artists=ARTISTS, scenes=3))
    assert "train_extra" not in rebuilt and not (tmp_path / "more" / "train_extra.jsonl").exists()
    with pytest.raises(EmojiDataError, match="unknown extra artist"):
        build_emoji_dataset(EmojiOptions(out=tmp_path / "x", cache=cache, artists=ARTISTS, extra_artists=("nope",)))


def test_newest_cached_release_by_version_not_by_name(tmp_path: Path) -> None:
    for name in ("emoji-datasource-google-3.0.0.tgz", "emoji-datasource-google-9.1.0.tgz",
                 "emoji-datasource-google-16.0.0.tgz", "emoji-datasource-google-blob-1.0.0.tgz"):
        (tmp_path / name).write_bytes(b"")
    # "3.0.0" sorts after "16.0.0" as text; 3.0.0 is also the pinned training-only blob release.
    assert fetch_package("google", tmp_path, npm="no-such-npm").name == "emoji-datasource-google-16.0.0.tgz"
    pinned = fetch_package("google-2017", tmp_path, npm="no-such-npm", version="3.0.0",
                           package="emoji-datasource-google")
    assert pinned.name == "emoji-datasource-google-3.0.0.tgz"
