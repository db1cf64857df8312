//! Query strings of list endpoints: pagination, repeatable `label=k=v` filters, and the
//! plain equality filters (`region`, `vpc_id`, ...).

use std::collections::BTreeMap;

use super::error::{Error, Result};
use super::model::{Labels, Page};

pub const DEFAULT_PER_PAGE: usize = 50;
pub const MAX_PER_PAGE: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub page: usize,
    pub per_page: usize,
    /// Every pair must be carried by a matching object.
    pub labels: Vec<(String, String)>,
    /// Equality filters on the keys the endpoint allows.
    pub filters: BTreeMap<String, String>,
}

impl Default for ListQuery {
    fn default() -> Self {
        Self {
            page: 1,
            per_page: DEFAULT_PER_PAGE,
            labels: Vec::new(),
            filters: BTreeMap::new(),
        }
    }
}

impl ListQuery {
    /// Parses `raw` (the part after `?`). `filter_keys` are the endpoint's equality
    /// filters; other unknown keys are ignored.
    pub fn parse(raw: Option<&str>, filter_keys: &[&str]) -> Result<Self> {
        let mut query = ListQuery::default();
        for (key, value) in pairs(raw) {
            match key.as_str() {
                "page" => query.page = parse_count("page", &value, usize::MAX)?,
                "per_page" => query.per_page = parse_count("per_page", &value, MAX_PER_PAGE)?,
                "label" => query.labels.push(parse_label(&value)?),
                k if filter_keys.contains(&k) => {
                    query.filters.insert(key, value);
                }
                _ => {}
            }
        }
        Ok(query)
    }

    pub fn matches_labels(&self, labels: &Labels) -> bool {
        labels_match(&self.labels, labels)
    }

    /// True when the object's value for `key` equals the filter (or there is none).
    pub fn matches(&self, key: &str, value: &str) -> bool {
        self.filters.get(key).is_none_or(|v| v == value)
    }

    pub fn paginate<T>(&self, items: Vec<T>) -> Page<T> {
        paginate(items, self.page, self.per_page)
    }
}

/// Decoded `key=value` pairs of a query string, in order.
pub fn pairs(raw: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn parse_count(name: &str, value: &str, max: usize) -> Result<usize> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 && n <= max => Ok(n),
        _ if max == usize::MAX => Err(Error::BadRequest(format!(
            "{name} must be a positive integer, got {value:?}"
        ))),
        _ => Err(Error::BadRequest(format!(
            "{name} must be an integer between 1 and {max}, got {value:?}"
        ))),
    }
}

/// `key=value` (split at the first `=`).
fn parse_label(value: &str) -> Result<(String, String)> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(Error::BadRequest(format!(
            "label filter must be key=value, got {value:?}"
        ))),
    }
}

pub fn labels_match(wanted: &[(String, String)], labels: &Labels) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
}

pub fn paginate<T>(items: Vec<T>, page: usize, per_page: usize) -> Page<T> {
    let total = items.len();
    let start = page.saturating_sub(1).saturating_mul(per_page);
    let items = items.into_iter().skip(start).take(per_page).collect();
    Page {
        items,
        page,
        per_page,
        total,
    }
}

/// `true` / `false` for a boolean query parameter, 400 otherwise.
pub fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::BadRequest(format!(
            "{name} must be true or false, got {value:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parse_defaults() {
        let q = ListQuery::parse(None, &[]).unwrap();
        assert_eq!(q, ListQuery::default());
        assert_eq!(q.per_page, 50);
    }

    #[test]
    fn parse_pages_labels_and_filters() {
        let q = ListQuery::parse(
            Some("page=2&per_page=10&label=a%2Fb%3Dc=d&label=x=&region=jkt&other=1"),
            &["region"],
        )
        .unwrap();
        assert_eq!(q.page, 2);
        assert_eq!(q.per_page, 10);
        // `a%2Fb%3Dc=d` decodes to `a/b=c=d`: the first `=` splits key and value.
        assert_eq!(
            q.labels,
            vec![("a/b".to_string(), "c=d".to_string()), ("x".to_string(), String::new())]
        );
        assert_eq!(q.filters.get("region").map(String::as_str), Some("jkt"));
        assert!(!q.filters.contains_key("other"));
    }

    #[test]
    fn parse_rejects_bad_values() {
        for raw in [
            "page=0",
            "page=x",
            "per_page=0",
            "per_page=101",
            "per_page=-1",
            "label=novalue",
            "label==v",
        ] {
            let err = ListQuery::parse(Some(raw), &[]).unwrap_err();
            assert!(matches!(err, Error::BadRequest(_)), "{raw}: {err:?}");
        }
        assert_eq!(ListQuery::parse(Some("per_page=100"), &[]).unwrap().per_page, 100);
    }

    #[test]
    fn label_matching_needs_every_label() {
        let have = labels(&[("a", "1"), ("b", "2")]);
        let want = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert!(labels_match(&[], &have));
        assert!(labels_match(&want(&[("a", "1")]), &have));
        assert!(labels_match(&want(&[("a", "1"), ("b", "2")]), &have));
        assert!(!labels_match(&want(&[("a", "2")]), &have));
        assert!(!labels_match(&want(&[("a", "1"), ("c", "3")]), &have));
    }

    #[test]
    fn pagination_slices_and_counts() {
        let items: Vec<u32> = (1..=7).collect();
        let p = paginate(items.clone(), 1, 3);
        assert_eq!((p.items, p.total), (vec![1, 2, 3], 7));
        let p = paginate(items.clone(), 3, 3);
        assert_eq!(p.items, vec![7]);
        let p = paginate(items, 4, 3);
        assert!(p.items.is_empty());
        assert_eq!(p.total, 7);
    }

    #[test]
    fn bools() {
        assert!(parse_bool("k", "true").unwrap());
        assert!(!parse_bool("k", "false").unwrap());
        assert!(parse_bool("k", "yes").is_err());
    }
}
