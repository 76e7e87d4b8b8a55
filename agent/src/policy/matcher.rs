//! Process matchers: `{ comm = ["llama-*"], cgroup = ["/system.slice/ollama.service"] }`.
//! Every field given must match (one of its patterns); a matcher with no field is refused,
//! because it would match every process on the host.

use serde::Deserialize;

/// The facts about a process that a matcher looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct Subject<'a> {
    pub comm: &'a str,
    pub exe: Option<&'a str>,
    /// The runtime id (`llama-cpp`, `ollama`…), when the model analysis found one.
    pub runtime: Option<&'a str>,
    /// Memory cgroup path.
    pub cgroup: Option<&'a str>,
    pub uid: u32,
    /// Paths of the model files it maps.
    pub models: &'a [String],
}

/// Which processes a rule is about.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawMatcher")]
pub struct Matcher {
    comm: Vec<String>,
    exe: Vec<String>,
    runtime: Vec<String>,
    cgroup: Vec<String>,
    uids: Vec<u32>,
    model: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatcher {
    #[serde(default)]
    comm: Vec<String>,
    #[serde(default)]
    exe: Vec<String>,
    #[serde(default)]
    runtime: Vec<String>,
    #[serde(default)]
    cgroup: Vec<String>,
    /// User names or numeric uids.
    #[serde(default)]
    user: Vec<String>,
    #[serde(default)]
    model: Vec<String>,
}

impl TryFrom<RawMatcher> for Matcher {
    type Error = String;

    fn try_from(raw: RawMatcher) -> Result<Self, String> {
        let fields = [
            &raw.comm,
            &raw.exe,
            &raw.runtime,
            &raw.cgroup,
            &raw.user,
            &raw.model,
        ];
        if fields.iter().all(|f| f.is_empty()) {
            return Err(
                "a match needs at least one of comm, exe, runtime, cgroup, user, \
                        model: an empty one would match every process"
                    .into(),
            );
        }
        if let Some(empty) = fields.iter().flat_map(|f| f.iter()).find(|p| p.is_empty()) {
            return Err(format!("an empty pattern {empty:?} matches nothing"));
        }
        let uids = raw
            .user
            .iter()
            .map(|u| user_id(u))
            .collect::<Result<_, _>>()?;
        Ok(Matcher {
            comm: raw.comm,
            exe: raw.exe,
            runtime: raw.runtime,
            cgroup: raw.cgroup,
            uids,
            model: raw.model,
        })
    }
}

impl Matcher {
    /// Whether the process matches every field the matcher gives.
    pub fn matches(&self, s: &Subject) -> bool {
        any_glob(&self.comm, Some(s.comm))
            && any_glob(&self.exe, s.exe)
            && any_glob(&self.runtime, s.runtime)
            && any_glob(&self.cgroup, s.cgroup)
            && (self.uids.is_empty() || self.uids.contains(&s.uid))
            && (self.model.is_empty() || s.models.iter().any(|m| any_glob(&self.model, Some(m))))
    }
}

/// True when there are no patterns, or `value` is known and one of them matches it.
fn any_glob(patterns: &[String], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| glob(p, v)))
}

/// Shell-style `*` (any run of characters, `/` included) and `?` (one character) matching.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A user name from /etc/passwd, or a numeric uid.
fn user_id(user: &str) -> Result<u32, String> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some(user)).then(|| fields.nth(1)?.parse().ok())?
        })
        .ok_or_else(|| format!("no user named {user:?} in /etc/passwd"))
}
