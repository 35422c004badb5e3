"""Anatomical regions and the anatomical groups that route images to models.

The groups follow the finding behind the product: fracture models transfer well between
regions of one anatomical group and badly between groups. A region whose group has no
installed model goes to the nearest group that has one (adjacency order of the table) and is
flagged ``out_of_group``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Region(StrEnum):
    SHOULDER = "shoulder"
    HUMERUS = "humerus"
    ELBOW = "elbow"
    FOREARM = "forearm"
    WRIST = "wrist"
    HAND = "hand"
    FINGER = "finger"
    HIP = "hip"
    FEMUR = "femur"
    KNEE = "knee"
    LEG = "leg"  # tibia / fibula
    ANKLE = "ankle"
    FOOT = "foot"
    OTHER = "other"  # chest, skull, spine, pelvis ...: not analysed
    UNKNOWN = "unknown"  # nothing specific could be read: not analysed


class AnatomicalGroup(StrEnum):
    UPPER_PROXIMAL = "upper-proximal"
    UPPER_MIDDLE = "upper-middle"
    UPPER_DISTAL = "upper-distal"
    LOWER_PROXIMAL = "lower-proximal"
    LOWER_MIDDLE = "lower-middle"
    LOWER_DISTAL = "lower-distal"


class GroupTableError(ValueError):
    """A group table that names a region twice, an unknown group, or a group without adjacency."""


@dataclass(frozen=True, slots=True)
class GroupTable:
    """Which regions belong to which group, and which groups are nearest to each group.

    ``adjacency[g]`` lists the other groups in the order they are tried when ``g`` has no
    installed model (nearest first).
    """

    members: Mapping[AnatomicalGroup, tuple[Region, ...]]
    adjacency: Mapping[AnatomicalGroup, tuple[AnatomicalGroup, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: dict[Region, AnatomicalGroup] = {}
        for group, regions in self.members.items():
            for region in regions:
                if region in (Region.OTHER, Region.UNKNOWN):
                    raise GroupTableError(f"region {region} cannot belong to a group")
                if region in seen:
                    raise GroupTableError(f"region {region} is in both {seen[region]} and {group}")
                seen[region] = group
        for group, near in self.adjacency.items():
            if group in near:
                raise GroupTableError(f"group {group} lists itself as adjacent")

    def group_of(self, region: Region) -> AnatomicalGroup | None:
        for group, regions in self.members.items():
            if region in regions:
                return group
        return None

    def regions_of(self, group: AnatomicalGroup) -> tuple[Region, ...]:
        return tuple(self.members.get(group, ()))

    def route(
        self, region: Region, available: frozenset[AnatomicalGroup] | set[AnatomicalGroup]
    ) -> tuple[AnatomicalGroup | None, bool]:
        """Return ``(group to analyse with, out_of_group)`` for ``region``.

        ``(None, False)`` when the region has no group (other/unknown) or no group with a model
        is reachable through the adjacency list.
        """
        own = self.group_of(region)
        if own is None:
            return None, False
        if own in available:
            return own, False
        for near in self.adjacency.get(own, ()):
            if near in available:
                return near, True
        return None, False


_G = AnatomicalGroup
_R = Region

DEFAULT_GROUP_TABLE = GroupTable(
    members={
        _G.UPPER_PROXIMAL: (_R.SHOULDER, _R.HUMERUS),
        _G.UPPER_MIDDLE: (_R.ELBOW, _R.FOREARM),
        _G.UPPER_DISTAL: (_R.WRIST, _R.HAND, _R.FINGER),
        _G.LOWER_PROXIMAL: (_R.HIP, _R.FEMUR),
        _G.LOWER_MIDDLE: (_R.KNEE, _R.LEG),
        _G.LOWER_DISTAL: (_R.ANKLE, _R.FOOT),
    },
    adjacency={
        _G.UPPER_PROXIMAL: (_G.UPPER_MIDDLE, _G.UPPER_DISTAL),
        _G.UPPER_MIDDLE: (_G.UPPER_DISTAL, _G.UPPER_PROXIMAL),
        _G.UPPER_DISTAL: (_G.UPPER_MIDDLE, _G.UPPER_PROXIMAL),
        _G.LOWER_PROXIMAL: (_G.LOWER_MIDDLE, _G.LOWER_DISTAL),
        _G.LOWER_MIDDLE: (_G.LOWER_DISTAL, _G.LOWER_PROXIMAL),
        _G.LOWER_DISTAL: (_G.LOWER_MIDDLE, _G.LOWER_PROXIMAL),
    },
)
