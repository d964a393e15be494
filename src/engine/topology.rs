//! Topology: the pipeline as nodes and edges, for `/topology` and the
//! dashboard.

use serde::Serialize;

/// What a node is; the dashboard draws tables as cylinders, queues as
/// parallelograms and handlers as boxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Table,
    Queue,
    Handler,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Node {
    pub id: String,
    pub kind: NodeKind,
    /// Scenarios (1 to 4) this node takes part in.
    pub scenarios: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub label: String,
    /// Scenarios this edge is part of.
    pub scenarios: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Scenario {
    pub number: u8,
    pub name: String,
    pub summary: String,
}

#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Topology {
    pub scenarios: Vec<Scenario>,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

impl Topology {
    pub fn scenario(&mut self, number: u8, name: &str, summary: &str) {
        self.scenarios.push(Scenario {
            number,
            name: name.into(),
            summary: summary.into(),
        });
    }

    pub fn node(&mut self, id: &str, kind: NodeKind) {
        if !self.nodes.iter().any(|n| n.id == id) {
            self.nodes.push(Node {
                id: id.into(),
                kind,
                scenarios: Vec::new(),
            });
        }
    }

    /// An edge between two nodes, which then take part in `scenarios`.
    pub fn edge(&mut self, from: &str, to: &str, label: &str, scenarios: &[u8]) {
        for scenario in scenarios {
            self.tag(from, *scenario);
            self.tag(to, *scenario);
        }
        self.edges.push(Edge {
            from: from.into(),
            to: to.into(),
            label: label.into(),
            scenarios: scenarios.to_vec(),
        });
    }

    /// Marks a node as taking part in `scenario`.
    pub fn tag(&mut self, node: &str, scenario: u8) {
        for node in self.nodes.iter_mut().filter(|n| n.id == node) {
            if !node.scenarios.contains(&scenario) {
                node.scenarios.push(scenario);
                node.scenarios.sort_unstable();
            }
        }
    }
}
