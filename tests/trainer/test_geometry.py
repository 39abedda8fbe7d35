"""Surface normals inside the graph equal the rendering CMAD's configs use, handle missing
points, and come out the same from depth + intrinsics as from the point cloud."""

import numpy as np
import pytest
import torch

from edge_inspect.trainer.data.render3d import normals_from_xyz as render_normals
from edge_inspect.trainer.geometry import SurfaceNormals, normals_from_xyz, xyz_from_depth

FX, FY, CX, CY = 80.0, 90.0, 31.5, 23.5


def _scene(h=48, w=64, holes=True):
    """A tilted floor at about 0.5 m with a spherical bump; some points missing."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    z = 0.5 / (1 - 0.1 * (u - CX) / FX + 0.05 * (v - CY) / FY)  # the plane z = 0.5 + 0.1 x - 0.05 y
    bump = np.clip(1 - ((u - 40) ** 2 + (v - 20) ** 2) / 100.0, 0, None)
    z = z - 0.02 * np.sqrt(bump)
    xyz = np.stack([(u - CX) * z / FX, (v - CY) * z / FY, z], axis=-1)
    if holes:
        xyz[5:8, 10:14] = 0.0  # a hole, as MVTec 3D-AD stores it
        xyz[30, 50] = np.nan   # and a NaN point
    return xyz, z


def test_graph_normals_equal_the_rendering_and_mark_missing_points():
    xyz, _ = _scene()
    want = render_normals(np.nan_to_num(xyz, nan=0.0))  # uint8 (n + 1) / 2 * 255, 0 invalid
    got = SurfaceNormals("xyz")(torch.tensor(xyz).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(got * 255 - want).max() <= 0.5 + 1e-6  # the rendering rounds to uint8
    n, ok = normals_from_xyz(torch.tensor(xyz).permute(2, 0, 1)[None])
    ok = ok[0].numpy()
    missing = np.zeros(ok.shape, bool)
    missing[5:8, 10:14] = missing[30, 50] = True
    near = missing.copy()  # a missing point or one of its 4 neighbours
    near[1:] |= missing[:-1]
    near[:-1] |= missing[1:]
    near[:, 1:] |= missing[:, :-1]
    near[:, :-1] |= missing[:, 1:]
    assert not ok[near].any() and ok[4, 9] and ok[8, 14]  # diagonal neighbours stay valid
    assert not ok[0].any() and not ok[:, -1].any()  # outer ring
    assert np.isfinite(n.numpy()).all()
    unit = np.linalg.norm(n[0].numpy(), axis=0)[ok]
    np.testing.assert_allclose(unit, 1.0, atol=1e-6)
    assert (n[0, 2].numpy()[ok] < 0).all()  # facing the camera (it looks along +z)


def test_depth_with_intrinsics_gives_the_same_normals_as_the_point_cloud():
    xyz, z = _scene()
    z = z.copy()
    z[5:8, 10:14] = 0.0
    z[30, 50] = np.nan
    pts = xyz_from_depth(torch.tensor(z)[None], FX, FY, CX, CY)
    np.testing.assert_allclose(pts[0].permute(1, 2, 0).numpy(), np.nan_to_num(xyz), atol=1e-12)
    a = SurfaceNormals("depth", (FX, FY, CX, CY))(torch.tensor(z)[None, None])
    b = SurfaceNormals("xyz")(torch.tensor(xyz).permute(2, 0, 1)[None])
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="needs intrinsics"):
        SurfaceNormals("depth")
    with pytest.raises(ValueError, match="modality 'rgb' unknown"):
        SurfaceNormals("rgb")


def test_background_plane_removal_keeps_the_object_only():
    xyz, _ = _scene()
    xyz = np.nan_to_num(xyz)
    module = SurfaceNormals("xyz", background_plane=True, border=4, background_distance=0.002)
    pts = module.points(torch.tensor(xyz).permute(2, 0, 1)[None])[0]
    kept = (pts != 0).any(dim=0).numpy()
    v, u = np.mgrid[0:48, 0:64]
    bump = (u - 40) ** 2 + (v - 20) ** 2 < 60  # deeper than 2 mm off the floor
    floor = (u - 40) ** 2 + (v - 20) ** 2 > 110
    assert kept[bump].all() and not kept[floor].any()


def test_filling_invalid_normals_repairs_sensor_dropouts():
    clean, _ = _scene(holes=False)
    dropped = clean.copy()
    rng = np.random.default_rng(0)
    dropped[rng.random(dropped.shape[:2]) < 0.01] = 0.0  # isolated dropouts
    ref = SurfaceNormals("xyz")(torch.tensor(clean).permute(2, 0, 1)[None])
    raw = SurfaceNormals("xyz")(torch.tensor(dropped).permute(2, 0, 1)[None])
    filled = SurfaceNormals("xyz", fill_invalid=2)(torch.tensor(dropped).permute(2, 0, 1)[None])
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (raw[inner] == 0).all(dim=1).float().mean() > 0.03  # black crosses
    assert not (filled[inner] == 0).all(dim=1).any()  # every inner pixel filled
    v, u = np.mgrid[0:48, 0:64]
    smooth = np.abs(np.hypot(u - 40, v - 20) - 10) > 2  # away from the bump's sharp rim
    diff = (filled - ref).abs().amax(dim=1)[0].numpy()
    assert diff[2:-2, 2:-2][smooth[2:-2, 2:-2]].max() < 0.05  # filled by its neighbours' normals
    assert diff[2:-2, 2:-2].mean() < 0.002
    n = filled[inner] * 2 - 1
    np.testing.assert_allclose(n.norm(dim=1).numpy(), 1.0, atol=1e-5)
