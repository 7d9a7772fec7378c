"""The project's seeded Gaussian noise, bit for bit as `src/engine/noise.rs` draws it.

Image i of a request with seed s uses the stream seeded with (s + i) mod 2**64: first its
initial latents, then any noise a stochastic scheduler asks for, step by step.
"""

import math

import numpy as np

_M = (1 << 64) - 1


def _rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & _M


class NoiseRng:
    """One image's stream: SplitMix64 seeding, xoshiro256++, Box-Muller in float64."""

    def __init__(self, seed):
        z = seed & _M
        state = []
        for _ in range(4):
            z = (z + 0x9E3779B97F4A7C15) & _M
            x = z
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M
            state.append(x ^ (x >> 31))
        self.s = state
        self.spare = None

    def _next_u64(self):
        s = self.s
        result = (_rotl((s[0] + s[3]) & _M, 23) + s[0]) & _M
        t = (s[1] << 17) & _M
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    def next_normal(self):
        if self.spare is not None:
            v, self.spare = self.spare, None
            return v
        a = self._next_u64()
        b = self._next_u64()
        u1 = ((a >> 11) + 1) * (1.0 / (1 << 53))
        u2 = (b >> 11) * (1.0 / (1 << 53))
        r = math.sqrt(-2.0 * math.log(u1))
        theta = 2.0 * math.pi * u2
        self.spare = float(np.float32(r * math.sin(theta)))
        return float(np.float32(r * math.cos(theta)))

    def normal(self, n):
        return np.array([self.next_normal() for _ in range(n)], dtype=np.float32)


class BatchNoise:
    """One stream per image; an image-major tensor takes equal chunks from each stream."""

    def __init__(self, seeds):
        self.streams = [NoiseRng(s) for s in seeds]

    def sample(self, shape):
        total = int(np.prod(shape))
        per = total // len(self.streams)
        parts = [st.normal(per) for st in self.streams]
        return np.concatenate(parts).reshape(shape)


def image_seed(seed, index):
    return (seed + index) & _M


if __name__ == "__main__":
    r = NoiseRng(0)
    print([repr(r.next_normal()) for _ in range(4)])
    r = NoiseRng(2**64 - 1)
    print([repr(r.next_normal()) for _ in range(3)])
