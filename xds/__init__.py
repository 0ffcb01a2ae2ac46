"""xDS: snapshot cache, ADS server (SotW and Delta) and Envoy resource builders; it knows Envoy, not our model.

The `xds-protos` wheel also ships a top-level `xds` package (the CNCF xds protos: `xds.core.v3`, ...)
which the generated Envoy modules import. Our package shadows it, so we merge its folder into our
`__path__`: `xds.core` and friends then resolve to the wheel while `xds.cache` etc. stay ours.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
