//! The downstream fine-tuning task. By default, topic classification: the project's labelled
//! sentences (a source of kind `task`, `datasets/topic_task.jsonl`), one of five topics per
//! sentence, answered with the topic's word — a task SmolLM2-135M learns in a few dozen
//! steps, so fine-tune accuracy (FA) separates a model that can still be fine-tuned from one
//! that cannot. Without a task source: arithmetic word problems with exact integer answers,
//! generated deterministically from the project's own templates (too hard for the 135M
//! model: 3% after fine-tuning).
//!
//! FA is the share of test problems answered right ([`is_correct`]) after benign fine-tuning
//! on the training problems. Train and test problems never share a normalized prompt.

use std::collections::HashSet;

use antibody_model::tiny::splitmix64;

use crate::split::normalize;

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Stable id (`task-train-0001`, `task-test-0001`).
    pub id: String,
    /// The template's name or the label (kept in the `category` column).
    pub template: String,
    /// The question.
    pub prompt: String,
    /// The exact answer (an integer, or a label word).
    pub answer: String,
    /// The target response.
    pub response: String,
}

const NAMES: &[&str] = &[
    "Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi",
    "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
];
const ITEMS: &[&str] = &[
    "apples", "marbles", "stickers", "pencils", "books", "coins", "cookies", "stamps", "shells",
    "cards", "balloons", "oranges",
];

/// A counter-based stream of random numbers.
struct Stream {
    state: u64,
}

impl Stream {
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(1);
        splitmix64(self.state)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }

    fn choose<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

fn problem(s: &mut Stream) -> (&'static str, String, i64) {
    let name = s.choose(NAMES);
    let item = s.choose(ITEMS);
    match s.next() % 8 {
        0 => {
            let (a, b) = (s.range(2, 40), s.range(2, 40));
            (
                "add",
                format!(
                    "{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
                ),
                a + b,
            )
        }
        1 => {
            let a = s.range(10, 60);
            let b = s.range(1, a - 1);
            (
                "subtract",
                format!(
                    "{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?"
                ),
                a - b,
            )
        }
        2 => {
            let (a, b) = (s.range(2, 12), s.range(2, 12));
            (
                "multiply",
                format!("A box holds {a} {item}. How many {item} are in {b} full boxes?"),
                a * b,
            )
        }
        3 => {
            let (a, b) = (s.range(3, 25), s.range(2, 9));
            (
                "rate",
                format!(
                    "{name} reads {a} pages every day. How many pages does {name} read in {b} days?"
                ),
                a * b,
            )
        }
        4 => {
            let (b, k) = (s.range(2, 9), s.range(2, 12));
            (
                "divide",
                format!(
                    "{} {item} are shared equally among {b} children. How many {item} does each child get?",
                    b * k
                ),
                k,
            )
        }
        5 => {
            let (a, b) = (s.range(5, 40), s.range(2, 30));
            let c = s.range(1, a + b - 1);
            (
                "two_step",
                format!(
                    "{name} has {a} {item}, finds {b} more and then loses {c}. How many {item} does {name} have now?"
                ),
                a + b - c,
            )
        }
        6 => {
            let (a, b) = (s.range(2, 15), s.range(2, 9));
            (
                "price",
                format!(
                    "A shop sells {item} for {a} dollars each. How many dollars do {b} {item} cost?"
                ),
                a * b,
            )
        }
        _ => {
            let (a, b) = (s.range(5, 60), s.range(2, 30));
            (
                "age",
                format!("{name} is {a} years old. How old will {name} be in {b} years?"),
                a + b,
            )
        }
    }
}

/// The target response for an answer.
pub fn response_for(answer: i64) -> String {
    format!("The answer is {answer}.")
}

/// Whether `text` answers a problem whose exact answer is `want`: an integer answer is read
/// as the text's last integer; a word answer (a label) as the text's first word, without
/// case or punctuation.
pub fn is_correct(want: &str, text: &str) -> bool {
    let want = want.trim();
    match want.parse::<i64>() {
        Ok(n) => last_integer(text) == Some(n),
        Err(_) => text
            .split_whitespace()
            .next()
            .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
            .is_some_and(|w| w.eq_ignore_ascii_case(want)),
    }
}

/// The last integer in `text`, the way FA reads an answer.
pub fn last_integer(text: &str) -> Option<i64> {
    let mut last = None;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b',') {
                i += 1;
            }
            let negative = start > 0 && bytes[start - 1] == b'-';
            let digits: String = text[start..i]
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            if let Ok(v) = digits.parse::<i64>() {
                last = Some(if negative { -v } else { v });
            }
        } else {
            i += 1;
        }
    }
    last
}

/// `train` and `test` distinct problems from `seed`: the first `test` unique problems are
/// the test set, the next `train` the training set.
pub fn problems(seed: u64, train: usize, test: usize) -> (Vec<Problem>, Vec<Problem>) {
    let mut stream = Stream {
        state: seed ^ 0x7461_736b_0000_0000,
    };
    let mut seen = HashSet::new();
    let (mut train_set, mut test_set) = (Vec::new(), Vec::new());
    let suffix = " Give the answer as a number.";
    // The template space is far larger than any sensible request; the bound only guards
    // against an endless loop.
    let mut tries = 0usize;
    while (train_set.len() < train || test_set.len() < test) && tries < 100 * (train + test) {
        tries += 1;
        let (template, question, answer) = problem(&mut stream);
        if !seen.insert(normalize(&question)) {
            continue;
        }
        let (set, split) = if test_set.len() < test {
            (&mut test_set, "test")
        } else {
            (&mut train_set, "train")
        };
        set.push(Problem {
            id: format!("task-{split}-{:04}", set.len() + 1),
            template: template.to_owned(),
            prompt: format!("{question}{suffix}"),
            answer: answer.to_string(),
            response: response_for(answer),
        });
    }
    (train_set, test_set)
}

/// Topic classification from labelled sentences `(id, label, text)`: `test` problems drawn
/// per label in proportion (seeded, stratified), then up to `train` of the rest. The prompt
/// names every label; the target response is the label.
pub fn labelled_problems(
    rows: &[(String, String, String)],
    seed: u64,
    train: usize,
    test: usize,
) -> (Vec<Problem>, Vec<Problem>) {
    let mut labels: Vec<&str> = rows.iter().map(|(_, l, _)| l.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    let question = |text: &str| {
        format!(
            "Which topic is this sentence about: {}? Answer with one word.\nSentence: {text}",
            labels.join(", ")
        )
    };
    let strata: Vec<&str> = rows.iter().map(|(_, l, _)| l.as_str()).collect();
    let test_rows: HashSet<usize> = antibody_base::stats::stratified_sample(&strata, test, seed)
        .into_iter()
        .collect();
    let problem = |i: usize, split: &str, n: usize| {
        let (_, label, text) = &rows[i];
        Problem {
            id: format!("task-{split}-{n:04}"),
            template: label.clone(),
            prompt: question(text),
            answer: label.clone(),
            response: label.clone(),
        }
    };
    let (mut train_set, mut test_set) = (Vec::new(), Vec::new());
    for i in 0..rows.len() {
        if test_rows.contains(&i) {
            test_set.push(problem(i, "test", test_set.len() + 1));
        } else if train_set.len() < train {
            train_set.push(problem(i, "train", train_set.len() + 1));
        }
    }
    (train_set, test_set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_distinct_and_correct() {
        let (train, test) = problems(3, 300, 50);
        assert_eq!((train.len(), test.len()), (300, 50));
        assert_eq!((train.clone(), test.clone()), problems(3, 300, 50));
        let test_norms: HashSet<String> = test.iter().map(|p| normalize(&p.prompt)).collect();
        assert!(
            train
                .iter()
                .all(|p| !test_norms.contains(&normalize(&p.prompt)))
        );
        for p in train.iter().chain(&test) {
            let answer: i64 = p.answer.parse().expect("an integer answer");
            assert!(answer >= 0, "{p:?}");
            assert_eq!(last_integer(&p.response), Some(answer));
            assert!(is_correct(&p.answer, &p.response));
        }
        // Spot-check the arithmetic of one template from its own text.
        let add = train
            .iter()
            .find(|p| p.template == "add")
            .expect("an add problem");
        let nums: Vec<i64> = add
            .prompt
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|t| t.parse().ok())
            .collect();
        assert_eq!(nums.iter().sum::<i64>().to_string(), add.answer);
    }

    #[test]
    fn topic_problems_are_stratified_and_disjoint() {
        let rows: Vec<(String, String, String)> = (0..100)
            .map(|i| {
                let label = ["food", "music"][i % 2];
                (
                    format!("t{i}"),
                    label.to_owned(),
                    format!("sentence number {i}"),
                )
            })
            .collect();
        let (train, test) = labelled_problems(&rows, 9, 60, 20);
        assert_eq!((train.len(), test.len()), (60, 20));
        assert_eq!(test.iter().filter(|p| p.answer == "food").count(), 10);
        let test_prompts: HashSet<&str> = test.iter().map(|p| p.prompt.as_str()).collect();
        assert!(
            train
                .iter()
                .all(|p| !test_prompts.contains(p.prompt.as_str()))
        );
        assert!(
            test[0]
                .prompt
                .starts_with("Which topic is this sentence about: food, music?")
        );
        assert!(is_correct("food", "Food."));
        assert!(is_correct("food", " food, clearly"));
        assert!(!is_correct("food", "It is about food"));
        assert!(!is_correct("12", "The answer is 13."));
    }

    #[test]
    fn reads_the_last_integer() {
        assert_eq!(last_integer("The answer is 42."), Some(42));
        assert_eq!(last_integer("3 + 4 = 7"), Some(7));
        assert_eq!(last_integer("It is -5"), Some(-5));
        assert_eq!(last_integer("1,250 dollars"), Some(1250));
        assert_eq!(last_integer("none"), None);
    }
}
