//! Reading a whole topic up to where it ends now, without a consumer group (for CLI commands that
//! need the current state of a small topic, such as the keys).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::{ADMIN_TIMEOUT, KafkaError, KafkaSettings};
use crate::topics::Topic;

pub fn read_to_end(settings: &KafkaSettings, topic: Topic) -> Result<Vec<OwnedMessage>, KafkaError> {
    let name = settings.names.name(topic);
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", format!("{}-reader-{}", settings.group_prefix, uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| settings.client_error(e))?;
    let md = consumer.fetch_metadata(Some(&name), ADMIN_TIMEOUT).map_err(|e| settings.client_error(e))?;
    let partitions = md.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().len()).unwrap_or(0);
    if partitions == 0 {
        return Err(KafkaError::NoSuchTopic(name));
    }
    let mut remaining = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let (low, high) = consumer.fetch_watermarks(&name, p, ADMIN_TIMEOUT).map_err(|e| settings.client_error(e))?;
        if high > low {
            remaining.insert(p, high);
            tpl.add_partition_offset(&name, p, Offset::Beginning).map_err(|e| settings.client_error(e))?;
        }
    }
    let mut out = Vec::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl).map_err(|e| settings.client_error(e))?;
    let deadline = Instant::now() + ADMIN_TIMEOUT * 4;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(KafkaError::Topic {
                topic: name,
                message: "could not read to the end in time; check the brokers".into(),
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if remaining.get(&m.partition()).is_some_and(|&end| m.offset() + 1 >= end) {
                    remaining.remove(&m.partition());
                }
                out.push(m.detach());
            }
            Some(Err(e)) => return Err(settings.client_error(e)),
            None => {}
        }
    }
    Ok(out)
}
