"""Joint compression of adapter collections: full, diagonal, per-adapter SVD, clusters."""

from lorabench.compress.clusters import adjusted_rand_index, fit_clusters
from lorabench.compress.collection import AdapterFit, CompressedCollection, CompressedModule
from lorabench.compress.diagonal import fit_diagonal, project_diagonal
from lorabench.compress.fit import GroupFit, ModuleFit
from lorabench.compress.full import fit_full, project_full
from lorabench.compress.module import CompressConfig, compress_module
from lorabench.compress.run import add_adapters, compress_collection
from lorabench.compress.svd import fit_svd

__all__ = [
    "AdapterFit", "CompressConfig", "CompressedCollection", "CompressedModule", "GroupFit", "ModuleFit",
    "add_adapters", "adjusted_rand_index", "compress_collection", "compress_module", "fit_clusters",
    "fit_diagonal", "fit_full", "fit_svd", "project_diagonal", "project_full",
]
