"""An image page drawn while its image was unavailable says so, and the next export, once the image is
back, gives it its picture (the site is not "up to date" while a page waits for one)."""
import shutil
from pathlib import Path

import atlas
from atlas.export import export


def test_an_image_page_gets_its_picture_once_the_image_is_back(small_atlas, tmp_path):
    path, data = small_atlas
    a = atlas.open(path)
    export(path, tmp_path / "warm", layers="conv1", progress=False)  # every channel's pictures now cached
    row = a.rows("SELECT t.image_id, i.path FROM top_activations t JOIN images i USING (image_id) "
                 "WHERE t.layer = 'conv1' ORDER BY t.channel, t.rank LIMIT 1")[0]
    i = row["image_id"]
    for cached in Path(path, "cache").rglob(f"{i}.png"):
        if cached.parent.name == "images":
            cached.unlink()  # the image page's own picture must be drawn again
    image = data / row["path"]
    aside = tmp_path / "aside.png"
    shutil.move(image, aside)

    site, logs = tmp_path / "site", []
    export(path, site, layers="conv1", progress=False, log=logs.append)
    assert any("image page" in line and "incomplete" in line for line in logs), logs
    assert f"img/{i}.webp" not in (site / "images" / f"{i}.html").read_text()

    shutil.move(aside, image)
    logs.clear()
    export(path, site, layers="conv1", progress=False, log=logs.append)
    assert not any("up to date" in line for line in logs), logs
    assert f"img/{i}.webp" in (site / "images" / f"{i}.html").read_text()
    assert (site / "images" / "img" / f"{i}.webp").is_file()
