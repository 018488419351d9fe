"""The rank runtime: what every process of the rank side opens, builds and supervises.

Written once for [`Pipeline`][mmsched.pipeline.Pipeline], its
[`SchedulerRank`][mmsched.scheduler.SchedulerRank]s, the node agent of another host
([`mmsched.node`][]) and a server's own ranks ([`RankGroup`][mmsched.rank_group.RankGroup]):

- [`mmsched.runtime.endpoints`][]: the payload store (made by the side that sends, attached
  by each rank that reads) and the transport endpoints, closed in reverse order of opening
  on every exit path;
- [`mmsched.runtime.building`][]: a request's multimodal inputs built from the processor's
  dict, with the config's hasher and size bound;
- [`mmsched.runtime.rundir`][]: a run's files: its private directory, a failed rank's error,
  a group sender's announcement in a rendezvous directory;
- [`mmsched.runtime.supervisor`][]: rank processes started, watched and stopped within a
  bound, none outliving the run.
"""
