import numpy as np
import pytest
import torch

from danceopd.packed import Raw, pack_state, unpack_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float8_e4m3fn])
def test_a_packed_state_unpacks_to_equal_tensors_of_every_dtype_and_shape(dtype):
    state = {"matrix": torch.randn(3, 5).to(dtype), "scalar": torch.tensor(2.5).to(dtype),
             "strided": torch.randn(4, 6).to(dtype).t()}  # not contiguous: packed as its values
    packed = pack_state(state)
    for v in packed.values():  # what the object store keeps out of band, without pickling torch
        assert isinstance(v, np.ndarray) or isinstance(v, Raw) and v.data.dtype == np.uint8
    back = unpack_state(packed)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k  # bitwise


def test_unpacking_passes_tensors_through_and_shares_the_arrays_memory():
    arr = np.arange(6, dtype=np.float32)
    arr.flags.writeable = False  # as read from the object store
    t = torch.ones(2)
    back = unpack_state({"a": arr, "t": t})
    assert back["t"] is t
    assert back["a"].data_ptr() == arr.ctypes.data  # no copy
