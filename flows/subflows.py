"""A stage flow run by DVC, shown in Prefect as a subflow of the ``udpdiff`` flow run that started
``dvc repro`` (a deployment run), although it runs in another process.

The ``udpdiff`` flow passes its flow run id to ``dvc repro`` in ``UDPDIFF_PREFECT_PARENT_FLOW_RUN_ID``.
Here, in the stage's process, we do what Prefect does for an in-process subflow
(``prefect.flow_engine.FlowRunEngine.create_flow_run``): create a tracking task run in the parent
flow run, create the stage's flow run with ``parent_task_run_id`` = that task run, and execute it
with ``prefect.flow_engine.run_flow``. The server then mirrors the subflow's states onto the
tracking task run (``UpdateSubflowParentTask``), so the UI shows the stage nested in the parent's
run graph with its own logs. Linking is best effort: any error there logs a warning and the stage
runs as a top-level flow run (tagged ``parent-flow-run:<id>`` when possible).
"""

from __future__ import annotations

import logging
import os
from typing import Any
from uuid import UUID, uuid4

logger = logging.getLogger(__name__)

PARENT_ENV = "UDPDIFF_PREFECT_PARENT_FLOW_RUN_ID"


def parent_flow_run_id() -> UUID | None:
    raw = os.environ.get(PARENT_ENV, "").strip()
    if not raw:
        return None
    try:
        return UUID(raw)
    except ValueError:
        logger.warning("%s=%r is not a flow run id; the stage runs as its own flow run", PARENT_ENV, raw)
        return None


def _run_name(flow: Any, parameters: dict[str, Any]) -> str:
    label = next((str(v) for k in ("stage", "name", "job") if (v := parameters.get(k))), None)
    return f"{flow.name}-{label}" if label else flow.name


def create_linked_flow_run(flow: Any, parameters: dict[str, Any], parent: UUID) -> Any:
    """A pending flow run of ``flow`` whose parent task run is a new tracking task run in ``parent``."""
    from prefect import Task
    from prefect.client.orchestration import get_client
    from prefect.context import TagsContext
    from prefect.states import Pending

    tracking = Task(name=flow.name, fn=flow.fn, version=flow.version)
    tracking._is_subflow_tracking_task = True  # what Prefect marks its own subflow tracking tasks with
    tags = {*TagsContext.get().current_tags, f"parent-flow-run:{parent}"}
    with get_client(sync_client=True) as client:
        client.read_flow_run(parent)  # fails clearly if the parent is not on this API
        task_run = client.create_task_run(task=tracking, flow_run_id=parent, name=_run_name(flow, parameters),
                                          dynamic_key=f"{_run_name(flow, parameters)}-{uuid4().hex[:8]}",
                                          state=Pending())
        return client.create_flow_run(flow=flow, parameters=flow.serialize_parameters(parameters), state=Pending(),
                                      parent_task_run_id=task_run.id, tags=sorted(tags))


def run_stage_flow(flow: Any, parameters: dict[str, Any]) -> Any:
    """Run ``flow(**parameters)``; under a ``udpdiff`` flow run (env ``UDPDIFF_PREFECT_PARENT_FLOW_RUN_ID``)
    as its subflow. Returns the flow's result; the flow's own failure raises as a direct call would."""
    parent = parent_flow_run_id()
    if parent is None:
        return flow(**parameters)
    try:
        flow_run = create_linked_flow_run(flow, parameters, parent)
    except Exception as err:  # linking is cosmetic: never let it stop the stage
        logger.warning("could not link this %s run to the Prefect flow run %s (%s: %s); running it unlinked",
                       flow.name, parent, type(err).__name__, err)
        try:
            from prefect import tags

            with tags(f"parent-flow-run:{parent}"):
                return flow(**parameters)
        except ImportError:
            return flow(**parameters)
    from prefect.flow_engine import run_flow

    logger.info("running %s as a subflow of flow run %s (flow run %s)", flow.name, parent, flow_run.id)
    return run_flow(flow, flow_run=flow_run, parameters=parameters)
