"""How ermgap's runs look in the MLflow UI (3.17): what kind of experiment it is, how chart mode orders its
sections, and how precise the runs table's summary values are. `ermgap.tracking` writes them."""

from __future__ import annotations

# The experiment's type, as the UI's own "experiment type" setting writes it ("Machine learning"): MLflow UIs
# that choose an experiment's page by its kind open this one on its runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI ignores that tag: a global "GenAI | Model training" selector decides every experiment's
# page, from the URL's `workflowType` or else the browser's last choice (GenAI at first). Every link ermgap
# prints carries this query, so it opens the runs table ("Model training").
UI_QUERY = "workflowType=machine_learning"
SUMMARY_PREFIX = "best/"  # the best checkpoint's values, one per run (ermgap.tracking.BEST)

def mark_kind(client, experiment) -> str:
    """Tag an MLflow experiment without a kind as a machine-learning one (its UI page is then the runs table);
    a kind a person chose stays. Returns the experiment's id."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


# Chart mode's sections, in the order a person reads them: the evaluation curves, the training curves
# (train/…, and λ / lr under the UI's "Model metrics"), then the best checkpoint's single values, collapsed.
CHART_SECTIONS = (("eval", True), ("train", True), ("Model metrics", True), ("feature_cache", False), ("best", False))


def chart_sections(view_key: str) -> dict:
    """The chart-mode part of a runs view (the UI's view state): the sections of CHART_SECTIONS in that order
    (`isAccordionReordered`: the UI keeps it instead of sorting sections by name). The UI adds a chart per
    metric to its section itself; a metric with another prefix gets a section after these."""
    sections = [{"uuid": f"{view_key}-{name}", "name": name, "display": shown, "isReordered": False,
                 "deleted": False, "isGenerated": True} for name, shown in CHART_SECTIONS]
    return {"compareRunCharts": [], "compareRunSections": sections, "isAccordionReordered": True}


def runs_view_fragment(experiment_id: str, key: str) -> str:
    """The URL fragment (after the UI's address) that opens a stored runs view, as a runs table."""
    return f"/#/experiments/{experiment_id}/runs?viewStateShareKey={key}&{UI_QUERY}"
