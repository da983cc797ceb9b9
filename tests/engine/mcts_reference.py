"""Pure-Python reference of the MCTS engine (csrc/engine/mcts/mcts.h), the spec the engine is
tested against: with the same seed and the same calls, it proposes the identical designs, under
both selection rules (UCT and Thompson).

Written for clarity, not speed; floating-point formulas follow the header's order exactly.
"""

from __future__ import annotations

import math
from functools import lru_cache

MASK64 = (1 << 64) - 1


class SplitMix64:
    """splitmix64; below(n) draws nothing for n <= 1, else rejects x < (2^64 - n) mod n."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        if n <= 1:
            return 0
        threshold = ((1 << 64) - n) % n
        while True:
            x = self.next()
            if x >= threshold:
                return x % n

    def normal(self) -> float:
        """Box-Muller on two 53-bit uniforms, u1 in (0, 1], u2 in [0, 1); the sine is unused."""
        u1 = float((self.next() >> 11) + 1) * 2.0**-53
        u2 = float(self.next() >> 11) * 2.0**-53
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2)


class _Node:
    __slots__ = (
        "parent",
        "level",
        "option",
        "children",
        "visits",
        "pending",
        "sum",
        "best",
        "closed",
    )

    def __init__(self, parent, level, option):
        self.parent, self.level, self.option = parent, level, option
        self.children = None  # list of node ids once expanded
        self.visits, self.pending, self.sum, self.best = 0, 0, 0.0, -math.inf
        self.closed = False


class ReferenceMCTS:
    def __init__(
        self,
        levels,
        selection="thompson",
        prior_strength=4.0,
        exploration=1.0 / math.sqrt(2.0),
        seed=0,
        normalize_rewards=True,
        on_repeat="reuse",
        max_nodes=1_000_000,
        virtual_loss=1.0,
        max_retries=100,
    ):
        self.names = [lv["name"] for lv in levels]
        self.options = [list(lv["options"]) for lv in levels]
        index = {n: i for i, n in enumerate(self.names)}
        # per level: [(earlier level index, set of allowed option indices)]
        self.reqs = [
            [
                (index[k], {self.options[index[k]].index(a) for a in v})
                for k, v in (lv.get("requires") or {}).items()
            ]
            for lv in levels
        ]
        self.selection, self.k = selection, prior_strength
        self.option_stats = [[[0, 0.0] for _ in opts] for opts in self.options]  # [n, sum]
        self.pairs = {}  # (prev_level, prev_option, level, option) -> [n, sum]
        self.tell_sum = self.tell_sumsq = 0.0
        self.c, self.normalize, self.on_repeat = exploration, normalize_rewards, on_repeat
        self.max_nodes, self.vl, self.max_retries = max_nodes, virtual_loss, max_retries
        self.rng = SplitMix64(seed)
        self.nodes = [_Node(-1, -1, -1)]
        self.designs = {}  # tuple design -> [count, pending, sum]
        self.pending = {}  # id -> (path, design)
        self.next_id = self.num_told = self.num_reused = 0
        self.lo = self.hi = 0.0
        self.have = False
        self.size = self._count_designs()

    # -- space -----------------------------------------------------------------------------
    def exists(self, level, design):
        return all(design[j] >= 0 and design[j] in allowed for j, allowed in self.reqs[level])

    def next_level(self, after, design):
        for lvl in range(after + 1, len(self.names)):
            if self.exists(lvl, design):
                return lvl
        return -1

    def _count_designs(self):
        n = len(self.names)

        @lru_cache(maxsize=None)
        def count(level, design):
            if level == n:
                return 1
            d = list(design)
            if not self.exists(level, d):
                return count(level + 1, design)
            total = 0
            for o in range(len(self.options[level])):
                d[level] = o
                total += count(level + 1, tuple(d))
            return total

        return count(0, tuple([-1] * n))

    # -- search ----------------------------------------------------------------------------
    def _ucb_child(self, parent, open_only):
        vl = self.vl
        np_ = float(parent.visits) + vl * float(parent.pending)
        two_ln = 2.0 * math.log(np_ if np_ > 1.0 else 1.0)
        spread = self.normalize and self.hi > self.lo
        inv_range = 1.0 / (self.hi - self.lo) if spread else 0.0
        best, pick = 0.0, -1
        for cid in parent.children:
            c = self.nodes[cid]
            if open_only and c.closed:
                continue
            n = float(c.visits) + vl * float(c.pending)
            if n == 0.0:
                score = math.inf
            else:
                inv_n = 1.0 / n
                if not self.normalize:
                    s = c.sum
                elif spread:
                    s = (c.sum - float(c.visits) * self.lo) * inv_range
                else:
                    s = 0.0
                score = s * inv_n + self.c * math.sqrt(two_ln * inv_n)
            if pick < 0 or score > best:
                best, pick = score, cid
        return pick

    def _expand(self, node_id, level):
        node = self.nodes[node_id]
        n = len(self.options[level])
        if len(self.nodes) + n > self.max_nodes:
            return False
        node.children = list(range(len(self.nodes), len(self.nodes) + n))
        self.nodes.extend(_Node(node_id, level, o) for o in range(n))
        return True

    def _thompson_pick(self, kids, level, prev, open_only, gm, sigma):
        k, pick, best = self.k, -1, 0.0
        for o in range(len(self.options[level])):
            c = self.nodes[kids[o]] if kids is not None else None
            if c is not None and open_only and c.closed:
                continue
            n_o, s_o = self.option_stats[level][o]
            q = (s_o + k * gm) / (float(n_o) + k)
            if prev is not None and (prev[0], prev[1], level, o) in self.pairs:
                n_p, s_p = self.pairs[(prev[0], prev[1], level, o)]
                q = (s_p + k * q) / (float(n_p) + k)
            n = float(c.visits) if c is not None else 0.0
            total = c.sum if c is not None else 0.0
            mean = (total + k * q) / (n + k)
            draw = mean + sigma / math.sqrt(n + k) * self.rng.normal()
            if pick < 0 or draw > best:
                best, pick = draw, o
        return pick

    def _descend_thompson(self):
        design = [-1] * len(self.names)
        path, node, after, prev, in_tree = [0], 0, -1, None, True
        n_all = float(self.num_told)
        gm = self.tell_sum / n_all if self.num_told > 0 else 0.0
        var = self.tell_sumsq / n_all - gm * gm if self.num_told > 1 else 0.0
        sigma = math.sqrt(var) if var > 0.0 else 1.0
        while True:
            lvl = self.next_level(after, design)
            if lvl < 0:
                break
            if in_tree and self.nodes[node].children is None and not self._expand(node, lvl):
                in_tree = False
            if in_tree:
                kids = self.nodes[node].children
                open_only = any(not self.nodes[c].closed for c in kids)
                o = self._thompson_pick(kids, lvl, prev, open_only, gm, sigma)
                node = kids[o]
                path.append(node)
            else:
                o = self._thompson_pick(None, lvl, prev, False, gm, sigma)
            design[lvl] = o
            after, prev = lvl, (lvl, o)
        return path, tuple(design), in_tree

    def _descend(self):
        if self.selection == "thompson":
            return self._descend_thompson()
        design = [-1] * len(self.names)
        path, node, after = [0], 0, -1
        while True:
            lvl = self.next_level(after, design)
            if lvl < 0:
                break
            if self.nodes[node].children is None and not self._expand(node, lvl):
                break
            kids = self.nodes[node].children
            # closed children (kReuse: all designs below told or pending) are skipped unless
            # every child is closed
            open_only = any(not self.nodes[c].closed for c in kids)
            fresh = [
                c
                for c in kids
                if self.nodes[c].visits == 0
                and self.nodes[c].pending == 0
                and not (open_only and self.nodes[c].closed)
            ]
            child = (
                fresh[self.rng.below(len(fresh))]
                if fresh
                else self._ucb_child(self.nodes[node], open_only)
            )
            path.append(child)
            design[lvl] = self.nodes[child].option
            after = lvl
            if fresh:
                break
            node = child
        leaf = self.next_level(after, design) < 0
        for lvl in range(after + 1, len(self.names)):
            if self.exists(lvl, design):
                design[lvl] = self.rng.below(len(self.options[lvl]))
        return path, tuple(design), leaf

    def _close(self, node_id):
        while node_id >= 0:
            nd = self.nodes[node_id]
            if nd.children is not None and not all(self.nodes[c].closed for c in nd.children):
                return
            nd.closed = True
            node_id = nd.parent

    def _backprop(self, path, reward):
        for i in path:
            nd = self.nodes[i]
            nd.visits += 1
            nd.sum += reward
            nd.best = max(nd.best, reward)

    def _ask_one(self):
        held = []
        attempt = 0
        while True:
            path, design, leaf = self._descend()
            if leaf and self.on_repeat == "reuse":
                self._close(path[-1])
            entry = self.designs.get(design)
            if (
                entry is None
                or self.on_repeat == "average"
                or attempt == self.max_retries
                or len(self.designs) >= self.size
            ):
                break
            if entry[0] > 0:
                self._backprop(path, entry[2] / float(entry[0]))
                self.num_reused += 1
            else:
                for i in path:
                    self.nodes[i].pending += 1
                held.append(path)
            attempt += 1
        for p in held:
            for i in p:
                self.nodes[i].pending -= 1
        for i in path:
            self.nodes[i].pending += 1
        self.designs.setdefault(design, [0, 0, 0.0])[1] += 1
        tid = self.next_id
        self.next_id += 1
        self.pending[tid] = (path, design)
        return tid, self.named(design)

    def ask(self, k=1):
        return [self._ask_one() for _ in range(k)]

    def tell(self, trial_id, reward):
        if not math.isfinite(reward):
            raise ValueError("reward must be finite")
        path, design = self.pending.pop(trial_id)
        for i in path:
            self.nodes[i].pending -= 1
        self._backprop(path, reward)
        self.lo, self.hi = (
            (min(self.lo, reward), max(self.hi, reward)) if self.have else (reward, reward)
        )
        self.have = True
        entry = self.designs[design]
        entry[0] += 1
        entry[1] -= 1
        entry[2] += reward
        self.num_told += 1
        self.tell_sum += reward
        self.tell_sumsq += reward * reward
        prev = None
        for lvl, o in enumerate(design):
            if o < 0:
                continue
            st = self.option_stats[lvl][o]
            st[0] += 1
            st[1] += reward
            if prev is not None:
                ps = self.pairs.setdefault((prev[0], prev[1], lvl, o), [0, 0.0])
                ps[0] += 1
                ps[1] += reward
            prev = (lvl, o)

    def named(self, design):
        return {self.names[lv]: self.options[lv][o] for lv, o in enumerate(design) if o >= 0}
