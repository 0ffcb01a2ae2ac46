"""meshaccel's xDS: snapshot cache, ADS server (SotW and Delta) and Envoy resource builders; it knows Envoy,
not our model. (Named apart from the `xds` package of the xds-protos wheel, which the generated Envoy
modules import.)"""
